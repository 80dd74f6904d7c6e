"""Rewards: JPEG sizes against PIL, log-probs against hand maths, plug-ins, validation, training."""
import io
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from ppo_ddpm.config import Config, ConfigError, RewardConfig
from ppo_ddpm.data import procedural_images, save_images
from ppo_ddpm.reward import (
    RewardCNN,
    RewardError,
    build_reward,
    check_reward,
    jpeg_compressibility,
    jpeg_incompressibility,
    load_reward_model,
    save_reward_model,
)
from ppo_ddpm.train_reward_model import fit_reward_cnn, main, split_held_out, train_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny end-to-end runs (conftest.py)


def _uint8_batch(b, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, h, 3), dtype=np.uint8)


def _to_x(u8):  # [B, H, W, 3] uint8 -> [B, 3, H, W] in [-1, 1], exactly invertible
    return torch.tensor(u8, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0


def _pil_jpeg_kb(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000.0


@pytest.fixture
def reward_model_file(tmp_path):
    torch.manual_seed(0)
    model = RewardCNN(3, 8, 2, 8)
    return save_reward_model(model, tmp_path / "rm.safetensors", held_out_accuracy=0.5), model


def test_jpeg_rewards_equal_pil_sizes():
    u8 = _uint8_batch(3, 16)
    u8[1] = 77  # flat
    x = _to_x(u8)
    expected = torch.tensor([_pil_jpeg_kb(img) for img in u8], dtype=torch.float32)
    r = build_reward(RewardConfig(kind="jpeg_compressibility"))(x)
    assert r.dtype == torch.float32 and r.shape == (3,)
    torch.testing.assert_close(r, -expected, rtol=0, atol=0)
    torch.testing.assert_close(build_reward(RewardConfig(kind="jpeg_incompressibility"))(x), expected, rtol=0, atol=0)


def test_flat_image_more_compressible_than_noise():
    flat = torch.zeros(1, 3, 32, 32)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert jpeg_compressibility(flat) > jpeg_compressibility(noise)
    assert jpeg_incompressibility(noise) > jpeg_incompressibility(flat)


def test_classifier_log_prob_by_hand(reward_model_file):
    path, model = reward_model_file
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    logits = model.eval()(x).double()
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    for target in (0, 1):
        r = build_reward(RewardConfig(kind="classifier", model_path=str(path), target_class=target))(x)
        torch.testing.assert_close(r.double(), logp[:, target], rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 1, 1, 0, 1])
    per_label = build_reward(RewardConfig(kind="classifier", model_path=str(path), target_class=-1))
    torch.testing.assert_close(per_label(x, labels).double(), logp[torch.arange(5), labels], rtol=1e-5, atol=1e-5)
    with pytest.raises(RewardError, match="class labels"):
        per_label(x)
    with pytest.raises(RewardError, match="target_class=2 but the classifier has 2 classes"):
        build_reward(RewardConfig(kind="classifier", model_path=str(path), target_class=2))


def test_real_vs_fake_reward_is_log_p_real_or_log_odds(reward_model_file):
    path, model = reward_model_file
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    logp = torch.log_softmax(model.eval()(x).double(), dim=1)
    r = build_reward(RewardConfig(kind="model", model_path=str(path)))(x)  # default: log p(real), bounded
    torch.testing.assert_close(r.double(), logp[:, 1], rtol=1e-5, atol=1e-5)
    r = build_reward(RewardConfig(kind="model", model_path=str(path), model_output="log_odds"))(x)
    torch.testing.assert_close(r.double(), logp[:, 1] - logp[:, 0], rtol=1e-5, atol=1e-5)


def test_model_reward_needs_a_path_and_a_valid_file(tmp_path):
    with pytest.raises(RewardError, match="reward.model_path"):
        build_reward(RewardConfig(kind="model", model_path=""))
    with pytest.raises(RewardError, match="nope.safetensors"):
        build_reward(RewardConfig(kind="model", model_path=str(tmp_path / "nope.safetensors")))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(RewardError, match="junk.safetensors"):
        load_reward_model(junk)
    from ppo_ddpm.utils.checkpoint import save_safetensors

    other = save_safetensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(RewardError, match="other.safetensors is not a reward model"):
        load_reward_model(other)


def test_reward_is_frozen_and_without_grad(reward_model_file):
    path, _ = reward_model_file
    fn = build_reward(RewardConfig(kind="model", model_path=str(path)))
    assert not fn.model.training
    assert all(not p.requires_grad for p in fn.model.parameters())
    x = torch.zeros(2, 3, 8, 8, requires_grad=True)
    r = fn(x)
    assert not r.requires_grad and r.shape == (2,) and r.dtype == torch.float32
    with pytest.raises(RewardError, match=r"expected x0 of shape \[B, 3, S, S\], got \(3, 8, 8\)"):
        fn(x[0])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = RewardCNN(3, 4, 3, 8).eval()
    path = save_reward_model(model, tmp_path / "sub" / "m.safetensors", class_names=["a", "b", "c"], note="x")
    loaded, meta = load_reward_model(path)
    assert meta["config"] == model.config and meta["class_names"] == ["a", "b", "c"] and meta["info"] == {"note": "x"}
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write left no temp file


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_test_rewards.py").write_text(textwrap.dedent("""
        import torch
        CONST = 3
        def brightness(x0):
            return x0.mean(dim=(1, 2, 3))
        def label_bonus(x0, class_labels=None):
            return x0.mean(dim=(1, 2, 3)) + (0 if class_labels is None else class_labels.float())
        def wrong_shape(x0):
            return x0.mean(dim=(2, 3))
        def with_nan(x0):
            r = x0.mean(dim=(1, 2, 3)).clone()
            r[0] = float("nan")
            r[1] = float("inf")
            return r
        def as_list(x0):
            return [1, 2]
        class Holder:
            @staticmethod
            def score(x0):
                return torch.ones(len(x0))
        def edits_in_place(x0, class_labels=None):
            r = x0.mean(dim=(1, 2, 3)).clone()
            x0.zero_()
            return r
        def raises(x0):
            raise RuntimeError("boom in my reward")
        def takes_nothing():
            return 0
        def takes_three(x0, class_labels, extra):
            return x0.mean(dim=(1, 2, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_test_rewards"
    sys.modules.pop("my_test_rewards", None)


def _plugin(spec):
    return build_reward(RewardConfig(kind="plugin", function=spec))


def test_plugin_rewards(plugin_module):
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(_plugin(f"{plugin_module}:brightness")(x), x.mean(dim=(1, 2, 3)))
    labels = torch.tensor([1, 0])
    torch.testing.assert_close(_plugin(f"{plugin_module}:label_bonus")(x, labels), x.mean(dim=(1, 2, 3)) + labels)
    assert torch.equal(_plugin(f"{plugin_module}:Holder.score")(x), torch.ones(2))
    r = _plugin(f"{plugin_module}:as_list")(x)
    assert r.dtype == torch.float32 and torch.equal(r, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "expected 'module:function'"),
        ("no_colon_here", "expected 'module:function'"),
        ("surely_not_a_module_xyz:f", "cannot import module 'surely_not_a_module_xyz'"),
        ("{m}:missing", "has no attribute 'missing'"),
        ("{m}:CONST", "'CONST' is a int, not callable"),
    ],
)
def test_bad_plugin_strings_named(plugin_module, spec, message):
    spec = spec.format(m=plugin_module)
    with pytest.raises(RewardError, match="reward.function=") as e:
        _plugin(spec)
    assert message in str(e.value) and repr(spec) in str(e.value)


@pytest.mark.parametrize("name", ["takes_nothing", "takes_three"])
def test_plugin_with_a_wrong_signature_is_named(plugin_module, name):
    with pytest.raises(RewardError, match=f"reward.function='{plugin_module}:{name}': cannot be called as f\\(x0\\)"):
        _plugin(f"{plugin_module}:{name}")


def test_an_error_inside_a_plugin_names_it(plugin_module):
    with pytest.raises(RewardError) as e:
        _plugin(f"{plugin_module}:raises")(torch.zeros(2, 3, 4, 4))
    msg = str(e.value)
    assert msg.startswith(f"reward.function='{plugin_module}:raises' raised RuntimeError: boom in my reward")
    assert "my_test_rewards.py:" in msg  # where it was raised


def test_plugin_gets_a_copy_of_x0_and_cannot_corrupt_the_rollout(plugin_module):
    from ppo_ddpm.ppo import PPOTrainer
    from test_trainer_grad import TinyEps, tiny_config

    x = torch.rand(2, 3, 4, 4)
    kept = x.clone()
    fn = _plugin(f"{plugin_module}:edits_in_place")
    torch.testing.assert_close(fn(x), kept.mean(dim=(1, 2, 3)))
    assert torch.equal(x, kept)
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.model.in_channels = 3
    trainer = PPOTrainer(cfg, TinyEps(channels=3), fn, "cpu")
    cache, info = trainer.rollout(seed=0)
    x0 = cache.state(trainer.n)
    assert x0.abs().sum() > 0  # not zeroed by the plug-in
    torch.testing.assert_close(cache.rewards, x0.float().mean(dim=(1, 2, 3)))


def test_plugin_wrong_shape_named(plugin_module):
    with pytest.raises(RewardError, match=r"wrong_shape returned shape \(2, 3\) for a batch of 2 images"):
        _plugin(f"{plugin_module}:wrong_shape")(torch.zeros(2, 3, 4, 4))


def test_nan_is_not_an_error_but_flagged(plugin_module):
    x = torch.zeros(3, 3, 4, 4)
    r = _plugin(f"{plugin_module}:with_nan")(x)
    assert r.shape == (3,) and torch.isnan(r[0]) and torch.isinf(r[1])
    r2, finite = check_reward(r, 3, "with_nan")
    assert finite.tolist() == [False, False, True]
    assert torch.equal(r2[2:], r[2:])


def test_check_reward_shapes_and_dtypes():
    r, ok = check_reward(np.array([1, 2, 3]), 3, "src")
    assert r.dtype == torch.float32 and ok.all()
    with pytest.raises(RewardError, match=r"reward src returned shape \(3, 1\)"):
        check_reward(torch.zeros(3, 1), 3, "src")
    with pytest.raises(RewardError, match=r"shape \(\)"):
        check_reward(1.0, 3, "src")
    with pytest.raises(RewardError, match="not a tensor of numbers"):
        check_reward(["a", "b"], 2, "src")
    with pytest.raises(RewardError, match="complex"):
        check_reward(torch.zeros(2, dtype=torch.complex64), 2, "src")


def test_split_held_out_is_deterministic_and_stratified():
    labels = torch.tensor([0] * 10 + [1] * 30)
    tr, held = split_held_out(labels, 0.2, seed=5)
    tr2, held2 = split_held_out(labels, 0.2, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(held, held2)
    assert sorted(torch.cat([tr, held]).tolist()) == list(range(40))
    assert (labels[held] == 0).sum() == 2 and (labels[held] == 1).sum() == 6
    assert not torch.equal(split_held_out(labels, 0.2, seed=6)[1], held)


def _separable(n):
    real = procedural_images(n, 8, seed=0)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    fake = (procedural_images(n, 8, seed=1) + 0.5 * noise).clamp(-1, 1)
    return real, fake


def test_short_training_separates_real_from_fake():
    real, fake = _separable(96)
    x = torch.cat([fake, real])
    y = torch.cat([torch.zeros(96, dtype=torch.long), torch.ones(96, dtype=torch.long)])
    model, acc = fit_reward_cnn(x, y, hidden_channels=8, steps=60, batch_size=32, lr=3e-3,
                                held_out_fraction=0.25, seed=0, progress=False)
    assert acc >= 0.9
    assert not model.training and all(not p.requires_grad for p in model.parameters())


def test_train_reward_model_cli_on_folders(tmp_path, capsys):
    real, fake = _separable(40)
    save_images(real, tmp_path / "data" / "real", "r")
    save_images(fake, tmp_path / "data" / "fake", "f")
    (tmp_path / "data" / "real" / "notes.txt").write_text("skipped")
    out = tmp_path / "run"
    assert main(["--set", f"data.root={tmp_path / 'data'}", "--set", f"output_dir={out}", "--set", "device=cpu",
                 "--set", "data.image_size=8", "--set", "model.sample_size=8", "--set", "reward.train_steps=40",
                 "--set", "reward.hidden_channels=8", "--set", "reward.batch_size=32"]) == 0
    path = out / "reward_model.safetensors"
    assert "held-out accuracy" in capsys.readouterr().out
    _, meta = load_reward_model(path)
    assert meta["info"]["held_out_accuracy"] >= 0.85 and meta["info"]["num_real"] == 40
    r = build_reward(RewardConfig(kind="model", model_path=str(path)))(torch.cat([real[:8], fake[:8]]))
    assert r[:8].mean() > r[8:].mean()


def test_fakes_sampled_from_base_ddpm(tmp_path):
    """The fakes are DDIM samples of the base model: regenerated here from the same seed, pixel for pixel."""
    from ppo_ddpm.data import to_uint8
    from ppo_ddpm.ddpm.ddim import make_ddim_plan
    from ppo_ddpm.ddpm.model import build_model, load_model, save_model
    from ppo_ddpm.ddpm.sample import ddim_sample
    from ppo_ddpm.ddpm.schedules import NoiseSchedule

    cfg = Config()
    cfg.output_dir, cfg.device = str(tmp_path), "cpu"
    cfg.data.image_size = cfg.model.sample_size = 8
    cfg.data.procedural_count = 24
    cfg.model.base_channels, cfg.model.channel_mults, cfg.model.attention_resolutions = 8, [1], []
    cfg.sampling.num_inference_steps = 2
    cfg.reward.num_fake, cfg.reward.batch_size, cfg.reward.train_steps, cfg.reward.hidden_channels = 20, 16, 5, 4
    with pytest.raises(ConfigError, match="model.pretrained is empty"):
        train_reward_model(cfg)
    torch.manual_seed(0)
    cfg.model.pretrained = str(save_model(build_model(cfg.model), tmp_path / "ddpm.pth", cfg.model))
    path, acc = train_reward_model(cfg)
    fakes = sorted((tmp_path / "data" / "fake").glob("fake_*.png"))
    assert len(fakes) == 20 and path.is_file() and 0.0 <= acc <= 1.0
    assert len(list((tmp_path / "data" / "real").glob("*.png"))) == 24

    model = load_model(cfg.model.pretrained)
    s = cfg.sampling
    plan = make_ddim_plan(NoiseSchedule.from_config(cfg.schedule).alphas_cumprod, s.num_inference_steps, s.eta,
                          s.spacing, s.set_alpha_to_one)
    g = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    expected = torch.cat([ddim_sample(model, plan, torch.randn((b, 3, 8, 8), generator=g), clip_x0=s.clip_x0, generator=g)
                          for b in (16, 4)])
    saved = np.stack([np.asarray(Image.open(f)) for f in fakes])
    assert saved.shape == (20, 8, 8, 3) and len(np.unique(saved.reshape(20, -1), axis=0)) == 20
    np.testing.assert_array_equal(saved, to_uint8(expected).numpy())


def test_one_image_per_class_is_a_clear_error(tmp_path, capsys):
    save_images(procedural_images(1, 8, seed=0), tmp_path / "data" / "real", "r")
    save_images(procedural_images(1, 8, seed=1), tmp_path / "data" / "fake", "f")
    assert main(["--set", f"data.root={tmp_path / 'data'}", "--set", f"output_dir={tmp_path / 'run'}", "--set", "device=cpu",
                 "--set", "data.image_size=8", "--set", "model.sample_size=8"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'real'}: 1 real image(s); at least 2 are needed" in err and "Traceback" not in err
