"""Rewards a practitioner uses: a classifier of labelled class folders, weighted sums logged per term,
plug-ins that receive labels and the iteration, reward time in the trainer's stats."""
import sys
import textwrap

import pytest
import torch

from ppo_ddpm.config import RewardConfig, RewardTermConfig
from ppo_ddpm.data import DataError, save_images
from ppo_ddpm.ppo import PPOTrainer
from ppo_ddpm.reward import (
    RewardError,
    WeightedSum,
    build_reward,
    jpeg_compressibility,
    load_reward_model,
    reward_step,
    term_means,
    trained_model_kind,
)
from ppo_ddpm.train_reward_model import class_folders, main
from test_trainer_grad import TinyEps, tiny_config


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "term_plugins.py").write_text(textwrap.dedent("""
        def mean(x0):
            return x0.mean(dim=(1, 2, 3))
        def with_step(x0, step=None):
            return x0.new_full((len(x0),), -1.0 if step is None else float(step))
        def keyword_labels(x0, *, class_labels=None, step=None):
            return class_labels.float() * 10 + (0 if step is None else step)
        def anything(x0, class_labels, **extra):
            return x0.new_full((len(x0),), float(extra["step"]))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "term_plugins"
    sys.modules.pop("term_plugins", None)


def test_weighted_sum_is_the_hand_sum_and_keeps_each_term(plugins):
    cfg = RewardConfig(terms=[RewardTermConfig(kind="jpeg_compressibility", weight=0.5),
                              RewardTermConfig(kind="plugin", function=f"{plugins}:mean", weight=-2.0),
                              RewardTermConfig(kind="plugin", function=f"{plugins}:with_step", weight=1.0, name="step")])
    fn = build_reward(cfg)
    assert isinstance(fn, WeightedSum) and fn.name == "0.5 jpeg_compressibility + -2 plugin + 1 step"
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with reward_step(7):
        r = fn(x)
    jpeg, mean = jpeg_compressibility(x), x.mean(dim=(1, 2, 3))
    torch.testing.assert_close(r, 0.5 * jpeg - 2.0 * mean + 7.0, rtol=1e-6, atol=1e-6)
    assert set(fn.last_terms) == {"jpeg_compressibility", "plugin", "step"}
    torch.testing.assert_close(fn.last_terms["plugin"], mean)
    stats = term_means(fn)
    assert stats["reward_term/step"] == 7.0 and stats["reward_term/jpeg_compressibility"] == pytest.approx(jpeg.mean().item())
    assert term_means(build_reward(RewardConfig(kind="jpeg_compressibility"))) == {}


def test_term_errors_name_the_term(plugins, tmp_path):
    with pytest.raises(RewardError, match=r"reward.terms\[1\] \(model\): .*needs reward.model_path"):
        build_reward(RewardConfig(terms=[RewardTermConfig(kind="jpeg_compressibility"), RewardTermConfig(kind="model")]))
    with pytest.raises(RewardError, match="names must be unique"):
        build_reward(RewardConfig(terms=[RewardTermConfig(kind="jpeg_compressibility", name="a"),
                                         RewardTermConfig(kind="jpeg_incompressibility", name="a")]))
    both = RewardConfig(terms=[RewardTermConfig(kind="model"), RewardTermConfig(kind="classifier")])
    with pytest.raises(RewardError, match="a 'model' and a 'classifier' term both use reward.model_path"):
        trained_model_kind(both)
    assert trained_model_kind(RewardConfig(terms=[RewardTermConfig(kind="classifier"), RewardTermConfig(kind="jpeg_compressibility")])) == "classifier"
    assert trained_model_kind(RewardConfig(kind="classifier", model_path="x")) is None
    assert trained_model_kind(RewardConfig(kind="plugin")) is None and trained_model_kind(RewardConfig()) == "model"


def test_plugins_receive_labels_and_step_by_keyword(plugins):
    x, labels = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])
    step = build_reward(RewardConfig(kind="plugin", function=f"{plugins}:with_step"))
    assert step(x, labels).tolist() == [-1.0, -1.0]  # outside PPO: step=None; labels not passed as step
    with reward_step(4):
        assert step(x, labels).tolist() == [4.0, 4.0]
        kw = build_reward(RewardConfig(kind="plugin", function=f"{plugins}:keyword_labels"))
        assert kw(x, labels).tolist() == [14.0, 24.0]
        assert build_reward(RewardConfig(kind="plugin", function=f"{plugins}:anything"))(x, labels).tolist() == [4.0, 4.0]
    with reward_step(0), reward_step(5):
        assert step(x).tolist() == [5.0, 5.0]  # the innermost block wins


def test_trainer_logs_reward_time_and_term_means(plugins):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.model.in_channels = 3  # rewards score RGB images
    cfg.reward = RewardConfig(terms=[RewardTermConfig(kind="plugin", function=f"{plugins}:mean", weight=2.0),
                                     RewardTermConfig(kind="plugin", function=f"{plugins}:with_step", name="it")])
    trainer = PPOTrainer(cfg, TinyEps(channels=3), build_reward(cfg.reward), "cpu")
    stats = trainer.step(3)
    assert stats["reward_term/it"] == 3.0  # the plug-in saw the iteration
    x0 = trainer.cache.state(trainer.n).float()
    assert stats["reward_term/plugin"] == pytest.approx(x0.mean().item(), abs=1e-6)
    assert stats["reward_mean"] == pytest.approx(2 * x0.mean().item() + 3.0, abs=1e-5)
    assert 0 <= stats["time_reward"] <= stats["time_rollout"]


def _class_data(root, n=24, size=8):
    """Three visibly different classes: dark, bright, and left-bright/right-dark images with noise."""
    g = torch.Generator().manual_seed(0)
    noise = 0.15 * torch.randn(3, n, 3, size, size, generator=g)
    ramp = torch.where(torch.arange(size) < size // 2, 0.6, -0.6).expand(size, size)
    for name, base, x in (("0", -0.6, noise[0]), ("1", 0.6, noise[1]), ("10", ramp, noise[2])):
        save_images((base + x).clamp(-1, 1), root / name, "img")


def test_classifier_trained_on_class_folders_is_the_classifier_reward(tmp_path, capsys):
    data = tmp_path / "data"
    _class_data(data)
    (data / ".hidden").mkdir()
    assert [d.name for d in class_folders(data)] == ["0", "1", "10"]  # numeric order, hidden folders skipped
    out = tmp_path / "run"
    assert main(["--set", f"data.root={data}", "--set", f"output_dir={out}", "--set", "device=cpu",
                 "--set", "reward.kind=classifier", "--set", "data.image_size=8", "--set", "model.sample_size=8",
                 "--set", "reward.train_steps=40", "--set", "reward.hidden_channels=8", "--set", "reward.batch_size=30"]) == 0
    path = out / "classifier.safetensors"
    assert "classifier: held-out accuracy" in capsys.readouterr().out
    _, meta = load_reward_model(path)
    acc = meta["info"]["held_out_accuracy"]
    assert acc >= 0.9
    assert meta["class_names"] == ["0", "1", "10"] and meta["info"]["counts"] == {"0": 24, "1": 24, "10": 24}
    bright = torch.full((2, 3, 8, 8), 0.6)
    for target in range(3):
        fn = build_reward(RewardConfig(kind="classifier", model_path=str(path), target_class=target))
        assert f"[{target}={meta['class_names'][target]!r}]" in fn.name
        r = fn(bright)
        assert r.shape == (2,) and bool((r <= 0).all())  # log-probabilities
        if target == 1:
            assert r.mean() > -0.5  # a bright image is class "1"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    loss, accs = ea.Scalars("reward_model/loss"), ea.Scalars("reward_model/held_out_accuracy")
    assert [e.step for e in loss] == [e.step for e in accs] == list(range(2, 41, 2))  # 20 points of 40 steps
    assert accs[-1].value == pytest.approx(acc) and loss[-1].value < loss[0].value


def test_classifier_needs_class_folders(tmp_path, capsys):
    with pytest.raises(DataError, match="has 1 class folder"):
        (tmp_path / "only").mkdir() or class_folders(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        class_folders(tmp_path / "missing")
    assert main(["--set", "reward.kind=classifier", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "data.root is empty" in capsys.readouterr().err and not (tmp_path / "run").exists()
