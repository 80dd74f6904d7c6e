"""diffusers in and out: a folder's scheduler_config.json drives the config; export to a pipeline folder
that DDIMPipeline / DDPMPipeline load and sample exactly as our DDIM loop does."""
import json
import logging

import pytest
import torch

from ppo_ddpm.config import ConfigError, ModelConfig, load_config
from ppo_ddpm.ddpm.ddim import DDIMPlan
from ppo_ddpm.ddpm.model import build_model, load_model, save_model
from ppo_ddpm.ddpm.sample import ddim_sample
from ppo_ddpm.ddpm.unet import UNet
from ppo_ddpm.ddpm.unet_to_diffusers import ExportError, unet_to_diffusers
from ppo_ddpm.export import export_diffusers, main

diffusers = pytest.importorskip("diffusers")

EXPORTABLE = ModelConfig(sample_size=8, base_channels=32, channel_mults=[1, 2], attention_resolutions=[4])
SCHEDULER = dict(num_train_timesteps=500, beta_start=0.0005, beta_end=0.015, beta_schedule="scaled_linear",
                 prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 timestep_spacing="leading")


UNET2D = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=4, attention_head_dim=8)


def _unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**UNET2D).eval()


@pytest.fixture
def pipeline_folder(tmp_path):
    """A diffusers DDIM pipeline folder (model_index.json, unet/, scheduler/) as save_pretrained writes it."""
    folder = tmp_path / "pipe"
    diffusers.DDIMPipeline(unet=_unet2d(), scheduler=diffusers.DDIMScheduler(**SCHEDULER)).save_pretrained(folder)
    return folder


def _yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("where", ["pipeline", "unet_subfolder", "unet_with_config_beside"])
def test_scheduler_config_is_followed_when_the_yaml_is_silent(pipeline_folder, tmp_path, where):
    folder = {"pipeline": pipeline_folder, "unet_subfolder": pipeline_folder / "unet"}.get(where)
    if folder is None:  # a bare UNet2DModel folder with scheduler_config.json copied beside config.json
        folder = tmp_path / "bare"
        _unet2d().save_pretrained(folder)
        (folder / "scheduler_config.json").write_text((pipeline_folder / "scheduler" / "scheduler_config.json").read_text())
    cfg = load_config(None, [f"model.pretrained={folder}", "model.sample_size=8"])
    assert (cfg.schedule.kind, cfg.schedule.num_train_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end) == \
        ("scaled_linear", 500, 0.0005, 0.015)
    assert cfg.model.prediction_type == "v_prediction"
    assert (cfg.sampling.clip_x0, cfg.sampling.set_alpha_to_one, cfg.sampling.steps_offset) == (None, False, 1)
    # the plan equals the one diffusers' scheduler makes, step by step
    ref = diffusers.DDIMScheduler.from_pretrained(pipeline_folder, subfolder="scheduler")
    ref.set_timesteps(cfg.sampling.num_inference_steps)
    plan = DDIMPlan.from_config(cfg)
    assert torch.equal(plan.timesteps, ref.timesteps)
    torch.testing.assert_close(plan.abar_t, ref.alphas_cumprod[ref.timesteps].float(), atol=1e-6, rtol=0)
    assert isinstance(build_model(cfg.model), torch.nn.Module)


def test_a_model_key_set_otherwise_in_the_yaml_is_a_named_error(pipeline_folder, tmp_path):
    path = _yaml(tmp_path, f"model:\n  pretrained: {pipeline_folder}\nschedule:\n  kind: linear\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "'schedule.kind' is 'linear'" in msg and "'scaled_linear'" in msg and "scheduler_config.json" in msg
    with pytest.raises(ConfigError, match="'model.prediction_type' is 'epsilon'"):
        load_config(None, [f"model.pretrained={pipeline_folder}", "model.prediction_type=epsilon"])
    # the same value written explicitly is fine
    assert load_config(None, [f"model.pretrained={pipeline_folder}", "schedule.kind=scaled_linear"]).schedule.kind == "scaled_linear"


def test_a_sampler_key_in_the_yaml_overrides_with_a_warning(pipeline_folder, tmp_path, caplog):
    path = _yaml(tmp_path, f"model:\n  pretrained: {pipeline_folder}\nsampling:\n  clip_x0: 2.0\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert cfg.sampling.clip_x0 == 2.0 and cfg.sampling.steps_offset == 1
    assert "'sampling.clip_x0' = 2.0 overrides None" in caplog.text


@pytest.mark.parametrize("where", ["pipeline", "unet_subfolder"])
def test_model_sizes_follow_the_unet_config_when_the_yaml_is_silent(pipeline_folder, where):
    """config.json gives model.sample_size (8 here, the default is 16), and data.image_size with it;
    the model then loads against the config with no size written anywhere."""
    folder = pipeline_folder if where == "pipeline" else pipeline_folder / "unet"
    cfg = load_config(None, [f"model.pretrained={folder}"], validate=True)
    assert (cfg.model.sample_size, cfg.data.image_size, cfg.model.in_channels, cfg.model.num_classes) == (8, 8, 3, 0)
    assert load_model(folder, cfg.model).sample_size == 8


def test_a_model_size_set_otherwise_is_a_named_error_and_class_embeds_are_classes(pipeline_folder, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.pretrained={pipeline_folder}", "model.sample_size=16"])
    msg = str(e.value)
    assert "'model.sample_size' is 16" in msg and "gives 8" in msg and str(pipeline_folder / "unet" / "config.json") in msg
    with pytest.raises(ConfigError, match="data.image_size must equal model.sample_size"):  # the images must match the model
        load_config(None, [f"model.pretrained={pipeline_folder}", "data.image_size=16"], validate=True)
    conditional = tmp_path / "conditional"
    diffusers.UNet2DModel(**{**UNET2D, "num_class_embeds": 4}).save_pretrained(conditional)
    assert load_config(None, [f"model.pretrained={conditional}"]).model.num_classes == 4
    bad = json.loads((conditional / "config.json").read_text())
    (conditional / "config.json").write_text(json.dumps({**bad, "sample_size": [8, 16]}))
    with pytest.raises(ConfigError, match=r"sample_size=\[8, 16\]: ppo_ddpm samples square images"):
        load_config(None, [f"model.pretrained={conditional}"])


def test_unsupported_or_missing_scheduler_configs(pipeline_folder, tmp_path, caplog):
    sc = pipeline_folder / "scheduler" / "scheduler_config.json"
    data = json.loads(sc.read_text())
    sc.write_text(json.dumps({**data, "thresholding": True}))
    with pytest.raises(ConfigError, match=r"scheduler_config.json: thresholding=True is not supported"):
        load_config(None, [f"model.pretrained={pipeline_folder}"])
    sc.write_text(json.dumps({**data, "beta_schedule": "sigmoid"}))
    with pytest.raises(ConfigError, match="beta_schedule='sigmoid' is not supported"):
        load_config(None, [f"model.pretrained={pipeline_folder}"])
    bare = tmp_path / "bare"
    _unet2d().save_pretrained(bare)
    with caplog.at_level(logging.WARNING):
        cfg = load_config(None, [f"model.pretrained={bare}"])
    assert cfg.schedule.kind == "linear" and "has no scheduler_config.json" in caplog.text


def _random_unet(cfg: ModelConfig, seed=0) -> UNet:
    """Our UNet with random (non-zero) weights everywhere, so every layer matters in the comparisons."""
    torch.manual_seed(seed)
    model = UNet.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("cfg", [
    EXPORTABLE,
    ModelConfig(sample_size=8, base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=2, attention_resolutions=[8, 2], num_classes=3),
], ids=["small", "3-levels-classes"])
def test_our_unet_converts_to_the_same_unet2d_function(cfg):
    model = _random_unet(cfg)
    unet2d = unet_to_diffusers(model, cfg)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])
    y = torch.tensor([1, 2]) if cfg.num_classes else None
    with torch.no_grad():
        want, got = model(x, t, y), unet2d(x, t, class_labels=y).sample
    assert want.abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_a_unet_with_per_layer_group_counts_is_refused():
    cfg = ModelConfig(sample_size=8, base_channels=8, channel_mults=[1, 2], attention_resolutions=[4])
    with pytest.raises(ExportError, match=r"GroupNorms use \[8, 16, 32\] groups.*multiples of 32"):
        unet_to_diffusers(UNet.from_config(cfg), cfg)


def _cfg_for(model_cfg, prediction_type, tmp_path):
    return load_config(None, [
        f"model.sample_size={model_cfg.sample_size}", f"model.base_channels={model_cfg.base_channels}",
        f"model.channel_mults={model_cfg.channel_mults}", f"model.attention_resolutions={model_cfg.attention_resolutions}",
        f"model.prediction_type={prediction_type}", "sampling.num_inference_steps=5", "sampling.eta=1.0",
        "sampling.spacing=trailing", "schedule.kind=scaled_linear", "schedule.beta_end=0.012", f"output_dir={tmp_path}",
    ])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exported_folder_samples_like_our_ddim_loop(tmp_path, prediction_type):
    cfg = _cfg_for(EXPORTABLE, prediction_type, tmp_path)
    model = _random_unet(cfg.model)
    out = export_diffusers(model, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == prediction_type
    got = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), eta=1.0, num_inference_steps=5, output_type="np").images
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    ours = ddim_sample(model, DDIMPlan.from_config(cfg), x_T, clip_x0=cfg.sampling.clip_x0, generator=g,
                       prediction_type=prediction_type)
    want = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(want - 0.5).max() > 0.05  # not a flat image
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-5, rtol=0)

    ddpm = diffusers.DDPMPipeline.from_pretrained(out)
    images = ddpm(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    assert images.shape == (1, 8, 8, 3) and torch.isfinite(torch.from_numpy(images)).all()

    # and back in: the folder is a model.pretrained whose scheduler config restores the run's keys
    back = load_config(None, [f"model.pretrained={out}", "model.sample_size=8"])
    assert back.schedule == cfg.schedule and back.model.prediction_type == prediction_type
    assert (back.sampling.spacing, back.sampling.clip_x0, back.sampling.steps_offset) == ("trailing", 1.0, 0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(build_model(back.model)(x, t), model(x, t), atol=1e-6, rtol=1e-5)


def test_a_diffusers_backed_model_exports_its_own_weights(tmp_path):
    src = tmp_path / "unet"
    _unet2d().save_pretrained(src)
    cfg = load_config(None, [f"model.pretrained={src}", f"output_dir={tmp_path}", "model.sample_size=8"])
    model = build_model(cfg.model)
    finetuned = save_model(model, tmp_path / "finetuned.pth", cfg.model)  # what finetune writes
    assert main(["--set", f"model.pretrained={src}", "--set", f"output_dir={tmp_path}", "--set", "model.sample_size=8"]) == 0
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "diffusers" / "unet")
    for k, v in model.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    assert load_model(finetuned, cfg.model) is not None


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    cfg = _cfg_for(EXPORTABLE, "epsilon", tmp_path)
    path = save_model(_random_unet(cfg.model), tmp_path / "m.pth", cfg.model)
    args = ["model.sample_size=8", "model.base_channels=32", "model.attention_resolutions=[4]"]
    argv = [x for a in args for x in ("--set", a)] + ["--model", str(path), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    before = (tmp_path / "o" / "unet" / "config.json").read_text()
    assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    assert (tmp_path / "o" / "unet" / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left
    assert main(["--model", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_configs_diffusers_yaml_follows_the_folder(pipeline_folder):
    """configs/diffusers.yaml leaves every scheduler key to the folder (the README's path)."""
    from pathlib import Path

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "diffusers.yaml"
    cfg = load_config(yaml_path, [f"model.pretrained={pipeline_folder}", "model.sample_size=8"])
    assert (cfg.schedule.kind, cfg.schedule.num_train_timesteps, cfg.model.prediction_type) == ("scaled_linear", 500, "v_prediction")
    assert (cfg.sampling.clip_x0, cfg.sampling.set_alpha_to_one, cfg.sampling.steps_offset) == (None, False, 1)
    assert cfg.sampling.num_inference_steps == 50 and cfg.reward.kind == "jpeg_compressibility"



def test_configs_diffusers_yaml_passes_validation(pipeline_folder, tmp_path, capsys):
    """The CLIs validate the whole config: our UNet's architecture keys (channel_mults, attention) are not
    checked against a diffusers folder's own UNet2DModel, and a value the folder brought is named with it."""
    from pathlib import Path

    from ppo_ddpm.config import ConfigError
    from ppo_ddpm.finetune import main as finetune_main

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "diffusers.yaml"
    sets = [f"model.pretrained={pipeline_folder}", f"output_dir={tmp_path / 'run'}"]  # sizes from the folder (8)
    cfg = load_config(yaml_path, sets, validate=True)
    assert (cfg.model.sample_size, cfg.data.image_size) == (8, 8)
    assert cfg.model.attention_resolutions == [8] and cfg.sampling.steps_offset == 1  # [8] is no resolution of our UNet
    with pytest.raises(ConfigError, match="model.attention_resolutions = \\[8\\]"):
        load_config(yaml_path, [f"output_dir={tmp_path / 'run'}", "model.sample_size=32", "data.image_size=32"],
                    validate=True)  # no folder: our own 32 px UNet, whose attention resolutions are checked
    bad = sets + ["sampling.num_inference_steps=500", "sampling.spacing=leading"]  # leading + the folder's steps_offset 1
    assert finetune_main(["--cfg", str(yaml_path)] + [a for s in bad for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert "sampling.steps_offset = 1" in err and "outside [0, 499]" in err and f"{pipeline_folder} (diffusers config)" in err
