"""Every CLI refuses a bad config before any stage: exit 2, one message naming key, value and origin.

A table of bad values (``--set`` and config files) goes through ``main(argv)`` of each of the four
CLIs in-process; nothing may be written into the output_dir (validation comes first).
"""
import importlib

import pytest
import torch

from ppo_ddpm.config import ConfigError, load_config
from ppo_ddpm.reward import RewardCNN, save_reward_model

CLIS = ["finetune", "eval", "pretrain", "train_reward_model"]


def takes_nothing():
    """A plug-in reward with a wrong signature."""
    return 0


# (--set overrides, fragments that must all be in the message)
BAD = [
    (["ppo.batch_size=0"], ["ppo.batch_size = 0", "must be >= 1"]),
    (["ppo.num_minibatches=3"], ["ppo.batch_size = 32, ppo.num_minibatches = 3", "multiple"]),
    (["ppo.microbatch=0"], ["ppo.microbatch = 0", ">= 1"]),
    (["ppo.num_epochs=0"], ["ppo.num_epochs = 0", ">= 1"]),
    (["ppo.clip_range=0"], ["ppo.clip_range = 0.0", "> 0"]),
    (["ppo.timestep_fraction=1.5"], ["ppo.timestep_fraction = 1.5", "in (0, 1]"]),
    (["ppo.timestep_fraction=0"], ["ppo.timestep_fraction = 0.0", "in (0, 1]"]),
    (["ppo.train_last_k=10"], ["ppo.train_last_k = 10", "sampling.num_inference_steps = 10", "must be <= 9"]),
    (["ppo.train_last_k=-1"], ["ppo.train_last_k = -1", ">= 0"]),
    (["sampling.num_inference_steps=0"], ["sampling.num_inference_steps = 0", ">= 1"]),
    (["sampling.num_inference_steps=1001"], ["sampling.num_inference_steps = 1001", "schedule.num_train_timesteps"]),
    (["ppo.adv_clip=-1"], ["ppo.adv_clip = -1.0", "> 0"]),
    (["ppo.per_step_clip=0"], ["ppo.per_step_clip = 0.0", "> 0"]),
    (["ppo.global_clip=-5"], ["ppo.global_clip = -5.0", "> 0"]),
    (["ppo.lr=-1e-4"], ["ppo.lr = -0.0001", "> 0"]),
    (["ppo.grad_clip=-1"], ["ppo.grad_clip = -1.0", "> 0"]),
    (["ppo.ema_decay=1.5"], ["ppo.ema_decay = 1.5", "in [0, 1)"]),
    (["ppo.kl_beta=-0.1"], ["ppo.kl_beta = -0.1", ">= 0"]),
    (["ppo.iterations=-1"], ["ppo.iterations = -1", ">= 0"]),
    (["ppo.weight_decay=-1"], ["ppo.weight_decay = -1.0", ">= 0"]),
    (["ppo.lr_warmup_steps=-1"], ["ppo.lr_warmup_steps = -1", ">= 0"]),
    (["ppo.group_min_count=40"], ["ppo.group_min_count = 40, ppo.group_buffer_size = 32", "<="]),
    (["sampling.eta=0"], ["sampling.eta = 0.0", "deterministic"]),
    (["ppo.sigma_floor=-0.1"], ["ppo.sigma_floor = -0.1", ">= 0"]),
    (["sampling.steps_offset=100"], ["sampling.steps_offset = 100", "outside [0, 999]"]),
    (["ppo.lr=.inf"], ["ppo.lr = inf", "finite"]),
    (["sampling.eta=-0.5"], ["sampling.eta = -0.5", "in [0, 1]"]),
    (["sampling.clip_x0=-1"], ["sampling.clip_x0 = -1.0", "> 0"]),
    (["schedule.beta_start=-1e-4"], ["schedule.beta_start = -0.0001", "in (0, 1)"]),
    (["schedule.beta_start=0.05"], ["schedule.beta_start = 0.05, schedule.beta_end = 0.02", "<="]),
    (["schedule.num_train_timesteps=0"], ["schedule.num_train_timesteps = 0", ">= 1"]),
    (["pretrain.log_every=0"], ["pretrain.log_every = 0", ">= 1"]),
    (["pretrain.steps=0"], ["pretrain.steps = 0", ">= 1"]),
    (["pretrain.ema_decay=1.5"], ["pretrain.ema_decay = 1.5", "in [0, 1)"]),
    (["pretrain.ckpt_every=0"], ["pretrain.ckpt_every = 0", ">= 1"]),
    (["reward.train_steps=0"], ["reward.train_steps = 0", ">= 1"]),
    (["reward.batch_size=0"], ["reward.batch_size = 0", ">= 2"]),
    (["reward.num_fake=0"], ["reward.num_fake = 0", ">= 1"]),
    (["reward.hidden_channels=0"], ["reward.hidden_channels = 0", ">= 1"]),
    (["reward.held_out_fraction=1"], ["reward.held_out_fraction = 1.0", "in (0, 1)"]),
    (["reward.kind=classifier"], ["reward.kind = 'classifier'", "needs reward.model_path"]),
    (["reward.kind=plugin", "reward.function=no_such_module_xyz:f"], ["reward.function", "cannot import module"]),
    (["reward.kind=plugin", "reward.function=test_bad_inputs:takes_nothing"],
     ["reward.function='test_bad_inputs:takes_nothing'", "cannot be called as f(x0)"]),
    (["reward.terms=[{{kind: plugin, function: 'no_such_module_xyz:f'}}]"], ["reward.terms[0] (plugin)", "cannot import module"]),
    (["reward.terms=[{{kind: jpeg_compressibility, weight: .nan}}]"], ["reward.terms[0] (jpeg_compressibility)", "finite"]),
    (["reward.terms=[{{kind: classifier, model_path: '{rm8}'}}]"], ["reward.terms[0] (classifier)", "3x8x8"]),
    (["reward.kind=classifier", "reward.target_class=-1", "reward.model_path={rm8}"],
     ["reward.target_class = -1", "unconditional"]),
    (["model.sample_size=0", "data.image_size=0"], ["model.sample_size = 0", "data.image_size = 0", ">= 1"]),
    (["model.base_channels=0"], ["model.base_channels = 0", ">= 1"]),
    (["model.channel_mults=[]"], ["model.channel_mults = []", "not be empty"]),
    (["model.channel_mults=[1,0]"], ["model.channel_mults = [1, 0]", "every element"]),
    (["model.num_res_blocks=0"], ["model.num_res_blocks = 0", ">= 1"]),
    (["model.dropout=1"], ["model.dropout = 1.0", "in [0, 1)"]),
    (["model.in_channels=1"], ["model.in_channels = 1", "RGB"]),
    (["model.num_classes=-1"], ["model.num_classes = -1", ">= 0"]),
    (["model.num_classes=2"], ["model.num_classes = 2", "class folders"]),
    (["model.sample_size=15", "data.image_size=15"], ["model.sample_size = 15", "divisible"]),
    (["model.attention_resolutions=[5]"], ["model.attention_resolutions = [5]", "match no UNet resolution"]),
    (["model.pretrained=/no/such/ddpm.pth"], ["model.pretrained = '/no/such/ddpm.pth'", "not found"]),
    (["data.root=/no/such/folder"], ["data.root = '/no/such/folder'", "not found"]),
    (["data.image_size=8"], ["data.image_size = 8, model.sample_size = 16", "must equal"]),
    (["data.procedural_count=0"], ["data.procedural_count = 0", ">= 1"]),
    (["eval.num_samples=0"], ["eval.num_samples = 0", ">= 1"]),
    (["eval.batch_size=0"], ["eval.batch_size = 0", ">= 1"]),
    (["eval.seed=-3"], ["eval.seed = -3"]),
    (["seed=-1"], ["seed = -1"]),
    (["seed=18446744073709551616"], ["seed = 18446744073709551616"]),
    (["device=gpu"], ["device = 'gpu'", "expected auto, cpu, cuda or cuda:N"]),
    (["device=cuda:99"], ["device = 'cuda:99'"]),
    (["device=meta"], ["device = 'meta'", "not supported"]),
    (["logging.log_every=0"], ["logging.log_every = 0", ">= 1"]),
    (["logging.ckpt_every=0"], ["logging.ckpt_every = 0", ">= 1"]),
    (["logging.sample_every=-1"], ["logging.sample_every = -1", ">= 0"]),
    (["reward.model_path={rm8}"], ["reward.model_path", "3x8x8", "3x16x16", "model.sample_size=16"]),
    (["output_dir="], ["output_dir = ''", "must name a folder"]),
    (["output_dir={file}"], ["is not a folder"]),
    (["output_dir={file}/sub"], ["is not a folder"]),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "a_file").write_text("not a folder")
    torch.manual_seed(0)
    rm8 = save_reward_model(RewardCNN(3, 4, 2, 8), d / "reward_8px.safetensors")  # another image size
    return {"file": str(d / "a_file"), "rm8": str(rm8), "out": d / "run"}


def _argv(overrides, paths):
    sets = [o.format(**paths) for o in overrides]
    if not any(s.startswith("output_dir=") for s in sets):
        sets.append(f"output_dir={paths['out']}")
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("overrides, fragments", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_every_cli_refuses_a_bad_value_before_any_stage(overrides, fragments, paths, capsys):
    if overrides == ["device=cuda:99"] and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 CUDA devices")
    for name in CLIS:
        main = importlib.import_module(f"ppo_ddpm.{name}").main
        assert main(_argv(overrides, paths)) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: "), (name, err)
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment.format(**paths) in err, (name, fragment, err)
        assert "--set" in err  # the origin of the value
        assert not paths["out"].exists(), f"{name} wrote into output_dir before refusing the config"


def test_cuda_device_without_cuda_is_a_config_error(paths, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from ppo_ddpm.finetune import main

    assert main(_argv(["device=cuda"], paths)) == 2
    assert "device = 'cuda': CUDA is not available" in capsys.readouterr().err


def test_file_values_are_named_with_their_file(tmp_path, capsys):
    from ppo_ddpm.pretrain import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ppo:\n  lr: -1e-4\n  grad_clip: -1\n")
    assert main(["--cfg", str(cfg), "--set", f"output_dir={tmp_path / 'run'}", "--set", "ppo.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "3 invalid config values" in err
    assert f"{cfg}: ppo.lr = -0.0001: must be > 0" in err
    assert f"{cfg}: ppo.grad_clip = -1.0: must be > 0" in err
    assert "--set: ppo.batch_size = 0: must be >= 1" in err
    assert not (tmp_path / "run").exists()


def test_a_non_utf8_config_file_is_named(tmp_path, capsys):
    from ppo_ddpm.train_reward_model import main

    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("output_dir: r\u00e9sultats\n".encode("latin-1"))
    assert main(["--cfg", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "not UTF-8" in err and "Traceback" not in err


def test_validation_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.lr=-1", "seed=-1", "ppo.batch_size=0"], validate=True)
    assert str(e.value).startswith("3 invalid config values")
