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

from ppo_ddpm.config import load_config
from ppo_ddpm.ddpm.ddim import make_ddim_plan
from ppo_ddpm.ddpm.model import build_model, save_model
from ppo_ddpm.ddpm.sample import ddim_sample
from ppo_ddpm.ddpm.schedules import NoiseSchedule
from ppo_ddpm.eval import evaluate, main, mean_pairwise_distance


def mean_pixel(x0):
    """Plug-in reward: mean pixel value per sample [B]."""
    return x0.float().mean(dim=(1, 2, 3))


TINY = [
    "model.sample_size=8", "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1]",
    "model.attention_resolutions=[]", "sampling.num_inference_steps=4", "sampling.clip_x0=null",
    "reward.kind=plugin", f"reward.function={__name__}:mean_pixel", "eval.num_samples=6", "eval.batch_size=4",
    "ppo.sigma_floor=0.05", "device=cpu",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
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


def test_identical_models(models):
    cfg, d, _ = models
    r = evaluate(cfg, str(d / "base.pth"), str(d / "base.pth"))
    assert r["kl_drift_per_step"] == [0.0] * 3 and r["kl_drift_total"] == 0.0
    assert r["timesteps"] == [750, 500, 250]  # the stochastic steps' (the last one, t = 0, has sigma = 0)
    assert r["win_rate"] == 0.0
    assert r["base_rewards"] == r["finetuned_rewards"]
    assert r["base_reward_mean"] == r["finetuned_reward_mean"] and r["base_reward_std"] == r["finetuned_reward_std"]
    assert r["base_diversity"] == r["finetuned_diversity"] > 0
    out = d / "run" / "eval"
    assert json.loads((out / "eval.json").read_text())["num_samples"] == 6
    for name in ("side_by_side.png", "reward_hist.png"):
        assert (out / name).stat().st_size > 0
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
    xs = {"base": [], "ft": []}
    for k, B in enumerate((4, 2)):
        for name, model in (("base", base), ("ft", shifted)):
            gen = torch.Generator().manual_seed(cfg.eval.seed + k)
            x_T = torch.randn((B, 3, 8, 8), generator=gen)
            xs[name].append(ddim_sample(model, plan, x_T, clip_x0=None, generator=gen))
    xb, xf = torch.cat(xs["base"]), torch.cat(xs["ft"])
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
