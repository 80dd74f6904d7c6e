"""ppo_ddpm.eval against hand computations on tiny fixed models.

- identical base and fine-tuned: KL drift 0 at every stochastic step, win rate 0, equal means/stds/diversity;
- fine-tuned = base with conv_out.bias + delta, so eps_ft = eps_base + delta everywhere: with no
  x_0 clipping, mu_ft - mu_base = c_t delta per pixel, c_t = sqrt(max(1 - abar_prev - sigma^2, 0))
  - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t), hence KL_t = D c_t^2 delta^2 / (2 s_t^2)
  exactly, for every sample (float64 below), over the stochastic steps only (sigma_t > 0: the
  deterministic last step of set_alpha_to_one is the environment's); with ppo.sample_at_floor every
  step samples at sigma_t = max(sigma_t, sigma_floor) and all of them count;
- rewards, win rate, std and diversity against independent sampling with ``ddim_sample``.
"""
import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ppo_ddpm.config import load_config
from ppo_ddpm.data import make_grid
from ppo_ddpm.ddpm.ddim import make_ddim_plan
from ppo_ddpm.ddpm.model import build_model, save_model
from ppo_ddpm.ddpm.sample import ddim_sample
from ppo_ddpm.ddpm.schedules import NoiseSchedule
from ppo_ddpm.eval import evaluate, format_summary, main, mean_pairwise_distance
from ppo_ddpm.plots import upscale


def mean_pixel(x0):
    """Plug-in reward: mean pixel value per sample [B]."""
    return x0.float().mean(dim=(1, 2, 3))


def some_nonfinite(x0):
    """mean_pixel with the first two rewards of every batch NaN and inf."""
    r = mean_pixel(x0)
    r[0], r[1] = float("nan"), float("inf")
    return r


def all_nan(x0):
    return torch.full((x0.shape[0],), float("nan"))


def huge(x0):
    return mean_pixel(x0) * 1e37  # finite in float32; squared (std) or summed in float32 it would overflow


TINY = [
    "model.sample_size=8", "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1]",
    "model.attention_resolutions=[]", "sampling.num_inference_steps=4", "sampling.clip_x0=null",
    "reward.kind=plugin", f"reward.function={__name__}:mean_pixel", "eval.num_samples=6", "eval.batch_size=4",
    "ppo.sigma_floor=0.05", "device=cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny end-to-end runs (conftest.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("eval")
    cfg = load_config(None, TINY + [f"output_dir={d / 'run'}"])
    torch.manual_seed(0)
    base = build_model(cfg.model)
    save_model(base, d / "base.pth", cfg.model)
    shifted = build_model(cfg.model)
    shifted.load_state_dict(base.state_dict())
    with torch.no_grad():
        shifted.conv_out.bias += 0.1
    save_model(shifted, d / "shifted.pth", cfg.model)
    return cfg, d, base


def samples(cfg, model, plan):
    """x_0 of ``model`` drawn as evaluate draws them (batch k from a generator seeded eval.seed + k)."""
    xs = []
    for k, B in enumerate((4, 2)):
        gen = torch.Generator().manual_seed(cfg.eval.seed + k)
        xs.append(ddim_sample(model, plan, torch.randn((B, 3, 8, 8), generator=gen), clip_x0=None, generator=gen))
    return torch.cat(xs)


def _plan(cfg):
    sc = cfg.sampling
    return make_ddim_plan(NoiseSchedule.from_config(cfg.schedule).alphas_cumprod, sc.num_inference_steps, sc.eta,
                          sc.spacing, sc.set_alpha_to_one)


def strict_json(path):
    """json.loads that refuses NaN / Infinity tokens (invalid JSON)."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_identical_models(models):
    cfg, d, base = models
    r = evaluate(cfg, str(d / "base.pth"), str(d / "base.pth"))
    assert r["kl_drift_per_step"] == [0.0] * 3 and r["kl_drift_total"] == 0.0
    assert r["timesteps"] == [750, 500, 250]  # the stochastic steps' (the last one, t = 0, has sigma = 0)
    assert r["win_rate"] == 0.0
    assert r["base_rewards"] == r["finetuned_rewards"]
    assert r["base_reward_mean"] == r["finetuned_reward_mean"] and r["base_reward_std"] == r["finetuned_reward_std"]
    assert r["base_diversity"] == r["finetuned_diversity"] > 0
    out = d / "run" / "eval"
    assert strict_json(out / "eval.json") == r
    # side_by_side.png: both panels are the grid of the very same samples
    grid = upscale(make_grid(samples(cfg, base, _plan(cfg)), nrow=4), 256)
    im = np.asarray(Image.open(out / "side_by_side.png").convert("RGB"))
    (h, w, _), (H, W, _) = grid.shape, im.shape
    pad = (W - 2 * w) // 3
    top = H - h - pad
    np.testing.assert_array_equal(im[top:top + h, pad:pad + w], grid)
    np.testing.assert_array_equal(im[top:top + h, 2 * pad + w:2 * pad + 2 * w], grid)
    hist = np.asarray(Image.open(out / "reward_hist.png").convert("RGB"))
    assert hist.ndim == 3 and len(np.unique(hist.reshape(-1, 3), axis=0)) > 2  # a drawing, not a blank
    assert list((d / "run" / "tb").glob("events.out.tfevents.*"))


def expected_kl(cfg, eta: float, min_sigma: float = 0.0):
    """(KL_t over the stochastic steps, their timesteps, the plan) of the bias shift 0.1, float64 by hand."""
    sc = cfg.sampling
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
    plan = make_ddim_plan(ac, sc.num_inference_steps, eta, sc.spacing, sc.set_alpha_to_one, min_sigma=min_sigma)
    a_t, a_p, sig = plan.abar_t.double(), plan.abar_prev.double(), plan.sigma.double()
    c = (1 - a_p - sig**2).clamp_min(0).sqrt() - a_p.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    s = sig.clamp_min(torch.tensor(cfg.ppo.sigma_floor, dtype=torch.float32).item())
    D = 3 * 8 * 8
    stochastic = sig > 0
    return (D * c**2 * 0.1**2 / (2 * s**2))[stochastic], plan.timesteps[stochastic].tolist(), plan


def test_shifted_bias_kl_and_rewards(models):
    cfg, d, base = models
    r = evaluate(cfg, str(d / "base.pth"), str(d / "shifted.pth"))

    expected, timesteps, plan = expected_kl(cfg, cfg.sampling.eta)
    assert len(expected) == 3 and r["timesteps"] == timesteps
    np.testing.assert_allclose(r["kl_drift_per_step"], expected.numpy(), rtol=2e-4)
    assert math.isclose(r["kl_drift_total"], float(expected.sum()), rel_tol=2e-4)

    # independent sampling of both models from the same seeds (batches of 4 then 2)
    shifted = build_model(cfg.model)
    shifted.load_state_dict(base.state_dict())
    with torch.no_grad():
        shifted.conv_out.bias += 0.1
    xb, xf = samples(cfg, base, plan), samples(cfg, shifted, plan)
    rb, rf = mean_pixel(xb).double().numpy(), mean_pixel(xf).double().numpy()
    np.testing.assert_allclose(r["base_rewards"], rb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["finetuned_rewards"], rf, rtol=1e-5, atol=1e-6)
    assert r["win_rate"] == pytest.approx(float(np.mean(rf > rb)))
    assert r["base_reward_mean"] == pytest.approx(rb.mean(), abs=1e-6)
    assert r["finetuned_reward_std"] == pytest.approx(rf.std(), abs=1e-6)
    # mean pairwise distance by hand
    flat = xf.flatten(1).double()
    pairs = [torch.linalg.vector_norm(flat[i] - flat[j]).item() for i in range(6) for j in range(i + 1, 6)]
    assert r["finetuned_diversity"] == pytest.approx(float(np.mean(pairs)), rel=1e-5)
    assert mean_pairwise_distance(flat[:1]) == 0.0


def test_cli_defaults_and_errors(models, capsys):
    cfg, d, _ = models
    run = ["--set", f"output_dir={d / 'cli'}"]
    args = sum((["--set", s] for s in TINY), []) + run
    assert main(args + ["--base", str(d / "base.pth")]) == 2  # no finetuned.pth in the run dir
    assert "finetuned.pth" in capsys.readouterr().err
    assert main(args + ["--base", str(d / "base.pth"), "--finetuned", str(d / "shifted.pth")]) == 0
    assert "fine-tuned mean reward" in capsys.readouterr().out
    bad = load_config(None, ["model.base_channels=16", "model.sample_size=8", "model.channel_mults=[1]",
                             "model.attention_resolutions=[]"])
    save_model(build_model(bad.model), d / "wide.pth", bad.model)
    assert main(args + ["--base", str(d / "base.pth"), "--finetuned", str(d / "wide.pth")]) == 2
    err = capsys.readouterr().err
    assert "wide.pth" in err and "base_channels" in err
    # a deterministic last step (sigma_t = 0) needs no floor: it is the environment's, with no KL
    pair = ["--base", str(d / "base.pth"), "--finetuned", str(d / "shifted.pth")]
    assert main(args + ["--set", "ppo.sigma_floor=0.0"] + pair) == 0
    capsys.readouterr()
    # a deterministic sampler (eta = 0) has no policy at all: a config error
    assert main(args + ["--set", "sampling.eta=0.0"] + pair) == 2
    err = capsys.readouterr().err
    assert "deterministic" in err and "sampling.eta" in err


def test_sample_at_floor_kl_over_every_step(models):
    """ppo.sample_at_floor with eta = 0: every step samples at sigma_floor, so every step has a KL."""
    cfg, d, _ = models
    cfg = copy.deepcopy(cfg)
    cfg.sampling.eta, cfg.ppo.sample_at_floor = 0.0, True
    r = evaluate(cfg, str(d / "base.pth"), str(d / "shifted.pth"))
    expected, timesteps, _ = expected_kl(cfg, 0.0, min_sigma=cfg.ppo.sigma_floor)
    assert len(expected) == 4 and r["timesteps"] == timesteps == [750, 500, 250, 0]
    np.testing.assert_allclose(r["kl_drift_per_step"], expected.numpy(), rtol=2e-4)


def _with_reward(cfg, name):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.reward.function = f"{__name__}:{name}"
    return cfg


def test_nonfinite_rewards_are_excluded_and_counted(models):
    cfg, d, base = models
    r = evaluate(_with_reward(cfg, "some_nonfinite"), str(d / "base.pth"), str(d / "shifted.pth"))
    shifted = build_model(cfg.model)
    shifted.load_state_dict(base.state_dict())
    with torch.no_grad():
        shifted.conv_out.bias += 0.1
    plan = _plan(cfg)
    rb, rf = mean_pixel(samples(cfg, base, plan)).double().numpy(), mean_pixel(samples(cfg, shifted, plan)).double().numpy()
    ok = np.array([False, False, True, True, False, False])  # batches of 4 and 2: the first two of each are NaN / inf
    assert r["base_nonfinite_rewards"] == r["finetuned_nonfinite_rewards"] == 4 and r["win_rate_pairs"] == 2
    assert r["base_reward_mean"] == pytest.approx(rb[ok].mean(), abs=1e-6)
    assert r["finetuned_reward_std"] == pytest.approx(rf[ok].std(), abs=1e-6)
    assert r["win_rate"] == pytest.approx(float(np.mean(rf[ok] > rb[ok])))
    assert [v is None for v in r["base_rewards"]] == list(~ok)
    assert strict_json(d / "run" / "eval" / "eval.json")["base_nonfinite_rewards"] == 4
    assert "warning: 4 of 6 base rewards are NaN/inf" in format_summary(r)


def test_all_nan_and_huge_rewards_do_not_crash(models):
    cfg, d, _ = models
    out = d / "run" / "eval"
    (out / "reward_hist.png").unlink(missing_ok=True)
    r = evaluate(_with_reward(cfg, "all_nan"), str(d / "base.pth"), str(d / "shifted.pth"))
    assert r["base_reward_mean"] is None and r["win_rate"] is None and r["win_rate_pairs"] == 0
    assert r["finetuned_nonfinite_rewards"] == 6 and r["reward_gain"] is None
    assert strict_json(out / "eval.json")["finetuned_reward_std"] is None
    assert (out / "reward_hist.png").is_file()  # drawn empty, its legend says "no finite values"
    summary = format_summary(r)
    assert "mean reward n/a" in summary and "win rate n/a" in summary and "+nan" not in summary
    r = evaluate(_with_reward(cfg, "huge"), str(d / "base.pth"), str(d / "shifted.pth"))
    assert r["base_nonfinite_rewards"] == 0 and math.isfinite(r["base_reward_mean"]) and abs(r["base_reward_mean"]) > 1e35
    assert (out / "reward_hist.png").is_file()


def test_a_nan_model_is_evaluated_not_crashed_on(models, capsys):
    cfg, d, base = models
    nan_model = build_model(cfg.model)
    nan_model.load_state_dict(base.state_dict())
    with torch.no_grad():
        nan_model.conv_out.weight.fill_(float("nan"))
    save_model(nan_model, d / "nan.pth", cfg.model)
    args = sum((["--set", s] for s in TINY), []) + ["--set", f"output_dir={d / 'run'}"]
    assert main(args + ["--base", str(d / "base.pth"), "--finetuned", str(d / "nan.pth")]) == 0
    out = capsys.readouterr().out
    assert "warning: 6 of 6 finetuned rewards are NaN/inf" in out and "win rate n/a" in out
    r = strict_json(d / "run" / "eval" / "eval.json")
    assert r["finetuned_nonfinite_rewards"] == 6 and r["kl_drift_total"] is None and r["finetuned_diversity"] is None
    assert r["base_nonfinite_rewards"] == 0 and r["base_reward_mean"] is not None
    assert r["finetuned_nonfinite_images"] == 6 and r["verdict"] == "non-finite"
    assert "verdict: non-finite" in out


def test_nan_models_against_real_data_and_as_control(models, tmp_path):
    """A NaN fine-tuned model and a NaN control: KID, image statistics, gains over the control and the
    verdict are null / n/a where they cannot be measured; the base's are still measured."""
    from ppo_ddpm.data import save_images

    cfg, d, base = models
    real = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    save_images(real, tmp_path / "data" / "real", "real")
    nan_cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}"])
    if not (d / "nan.pth").is_file():
        pytest.skip("needs the NaN model of test_a_nan_model_is_evaluated_not_crashed_on")
    r = evaluate(nan_cfg, str(d / "base.pth"), str(d / "nan.pth"), control_path=str(d / "nan.pth"))
    assert r["finetuned"]["kid"] is None and r["finetuned"]["grain"] is None and r["base"]["kid"] is not None
    assert r["control_nonfinite_rewards"] == 6 and r["control_reward_mean"] is None and r["gain_over_control"] is None
    assert r["real"]["num_images"] == 8 and r["verdict"] == "non-finite"
    summary = format_summary(r)
    assert "KID base" in summary and "fine-tuned n/a" in summary and "6 of 6 control rewards are NaN/inf" in summary
    assert strict_json(tmp_path / "run" / "eval" / "eval.json")["gain_over_control_se"] is None


def test_cli_finds_the_runs_data_through_pipeline_json(models, tmp_path, capsys):
    """Without --base, eval takes the run's recorded stages: the pretrained model and the data, so KID and
    grain are measured against the run's real images as in finetune's own evaluation."""
    import shutil

    from ppo_ddpm.data import save_images

    cfg, d, _ = models
    run = tmp_path / "run"
    save_images(torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1, run / "data" / "real", "real")
    shutil.copy(d / "base.pth", run / "base.pth")
    (run / "pipeline.json").write_text(json.dumps({"data": {"path": "data", "seconds": 0.0},
                                                   "pretrain": {"path": "base.pth", "seconds": 0.0}}))
    args = sum((["--set", s] for s in TINY), []) + ["--set", f"output_dir={run}"]
    assert main(args + ["--finetuned", str(d / "shifted.pth")]) == 0
    assert "vs real data (6 images)" in capsys.readouterr().out
    r = strict_json(run / "eval" / "eval.json")
    assert r["base_path"] == str(run / "base.pth") and r["real"]["num_images"] == 6 and r["finetuned"]["kid"] is not None


def _constant_images(value: float, n: int, size: int = 8) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


def test_real_images_are_the_base_models_training_data(tmp_path):
    """KID's reference is what pretraining reads: data.root/real, else data.root itself, else (for a
    class-conditional model) the union of its class folders, subsampled at random rather than by class."""
    from ppo_ddpm.data import save_images
    from ppo_ddpm.eval import real_images

    sets = ["model.sample_size=8", "data.image_size=8"]
    flat, classes, empty = tmp_path / "flat", tmp_path / "classes", tmp_path / "empty"
    save_images(_constant_images(0.5, 3), flat, "img")
    for c, value in enumerate((-1.0, 0.0, 1.0)):
        save_images(_constant_images(value, 4), classes / str(c), "img")
    empty.mkdir()

    assert real_images(load_config(None, sets)) is None  # no data folder: nothing to compare with
    x = real_images(load_config(None, sets + [f"data.root={flat}"]))
    assert x.shape == (3, 3, 8, 8) and torch.allclose(x, torch.full_like(x, 0.5), atol=1 / 255)
    cond = load_config(None, sets + [f"data.root={classes}", "model.num_classes=3"])
    assert sorted(real_images(cond)[:, 0, 0, 0].round().tolist()) == [-1.0] * 4 + [0.0] * 4 + [1.0] * 4
    subset = real_images(cond, limit=6)[:, 0, 0, 0].round()
    assert len(subset) == 6 and len(set(subset.tolist())) > 1  # not just the first class folder
    assert torch.equal(subset, real_images(cond, limit=6)[:, 0, 0, 0].round())  # a fixed subset
    assert real_images(load_config(None, sets + [f"data.root={empty}"])) is None  # named on stderr
