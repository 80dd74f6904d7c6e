"""``objective: per_step`` with ``log_prob_reduction: mean``, ``per_step_clip: null`` and ``grad_mask: ppo`` is
DDPO's loss (Black et al. 2023): the same value and the same gradient on identical inputs (model, noise
schedule, rollout, advantages), float32, to 1e-5 relative.

DDPO's loss is written here from its published formulas (ddpo-pytorch, ``ddim_with_logprob.py`` and
``train.py``), without any of the trainer's helpers; the DDIM mean is diffusers' ``DDIMScheduler.step``,
which DDPO's step copies:

    std_t    = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
    log_prob = mean over C, H, W of  -(x_prev - mu)^2 / (2 std_t^2) - log std_t - log sqrt(2 pi)
    A        = clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio    = exp(log_prob(theta) - log_prob(old))
    loss     = mean over samples and timesteps of max(-A ratio, -A clamp(ratio, 1 - e, 1 + e))
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from ppo_ddpm.ppo import PPOTrainer
from test_trainer_grad import TinyEps, brightness, grads, tiny_config

diffusers = pytest.importorskip("diffusers")

CLIP_RANGE = 1e-4  # ddpo-pytorch's default train.clip_range


def ddpo_scheduler(trainer) -> "diffusers.DDIMScheduler":
    """diffusers' DDIM scheduler of the trainer's sampling config, on the same abar values (float32)."""
    sc, cfg = trainer.cfg.sampling, trainer.cfg
    sched = diffusers.DDIMScheduler(num_train_timesteps=cfg.schedule.num_train_timesteps, beta_schedule="linear",
                                    beta_start=cfg.schedule.beta_start, beta_end=cfg.schedule.beta_end,
                                    timestep_spacing=sc.spacing, clip_sample=sc.clip_x0 is not None,
                                    clip_sample_range=sc.clip_x0 or 1.0, set_alpha_to_one=sc.set_alpha_to_one, steps_offset=0)
    sched.set_timesteps(sc.num_inference_steps)
    assert torch.equal(sched.timesteps, trainer.plan.timesteps)
    from ppo_ddpm.ddpm.schedules import NoiseSchedule

    abar = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod.float()  # identical inputs: the same schedule
    torch.testing.assert_close(sched.alphas_cumprod, abar, rtol=1e-5, atol=0)  # (diffusers' own, to fp32 rounding)
    sched.alphas_cumprod = abar
    sched.final_alpha_cumprod = torch.tensor(1.0) if sc.set_alpha_to_one else abar[0]
    return sched


def ddpo_log_prob(model, sched, eta: float, t: int, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """DDPO's per-sample log-prob of x_prev: per-pixel Gaussian log-density averaged over C, H, W (float32)."""
    eps = model(x, torch.full((x.shape[0],), t))
    mu = sched.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample  # the DDIM mean
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t = sched.alphas_cumprod[t]
    a_p = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
    log_prob = -((x_prev.detach() - mu) ** 2) / (2 * std**2) - torch.log(std) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddpo_loss(model, old, sched, eta, states, advantages, adv_clip_max, clip_range):
    """mean over samples and timesteps of DDPO's clipped per-step loss; states [T+1, B, ...] (x_T .. x_0) of one rollout."""
    adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    losses, ratios = [], []
    for j, t in enumerate(sched.timesteps.tolist()):
        x, x_prev = states[j], states[j + 1]
        with torch.no_grad():
            old_log_prob = ddpo_log_prob(old, sched, eta, t, x, x_prev)  # recorded at sampling time
        ratio = torch.exp(ddpo_log_prob(model, sched, eta, t, x, x_prev) - old_log_prob)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        losses.append(torch.mean(torch.maximum(unclipped, clipped)))
        ratios.append(ratio.detach())
    return torch.stack(losses).mean(), torch.stack(ratios)


@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_per_step_mean_is_ddpo(use_kernels):
    cfg = tiny_config(objective="per_step", log_prob_reduction="mean", per_step_clip=None, grad_mask="ppo",
                      clip_range=CLIP_RANGE, sigma_floor=0.0, kl_beta=0.0, adv_clip=1.5, use_kernels=use_kernels)
    cfg.model.in_channels, cfg.model.sample_size = 3, 8  # D = 192
    torch.manual_seed(0)
    trainer = PPOTrainer(cfg, TinyEps(channels=3), brightness, "cpu")
    assert trainer.policy_steps == list(range(trainer.n))  # every step stochastic: DDPO trains them all
    _, info = trainer.rollout(seed=11)
    assert info["skipped"] == 0
    old = copy.deepcopy(trainer.policy)
    with torch.no_grad():  # move the policy off the rollout's, so that ratios differ from 1 and some clip
        for q in trainer.policy.parameters():
            q.add_(0.002 * torch.randn_like(q))
    trainer.params_changed()
    B = cfg.ppo.batch_size
    rows = torch.randperm(B)
    steps = trainer.cache.timestep_plan(5, trainer.n, torch.arange(trainer.n))[rows]
    stats = trainer.minibatch_gradient(rows, steps)
    g_trainer = grads(trainer.policy)

    trainer.policy.zero_grad(set_to_none=True)
    sched = ddpo_scheduler(trainer)
    states = torch.stack([trainer.state(i).float() for i in range(trainer.n + 1)])  # x_T, then the cached actions
    loss, ratio = ddpo_loss(trainer.policy, old, sched, cfg.sampling.eta, states, trainer.cache.advantages,
                            cfg.ppo.adv_clip, CLIP_RANGE)
    A, e = trainer.cache.advantages, CLIP_RANGE
    assert ((ratio - 1).abs() <= e).any()  # inside the clip range
    assert ((ratio > 1 + e) & (A > 0)).any() and ((ratio < 1 - e) & (A < 0)).any()  # the clipped term: no gradient
    assert ((ratio > 1 + e) & (A < 0)).any() and ((ratio < 1 - e) & (A > 0)).any()  # outside, gradient (not 'strict')
    assert (A.abs() == cfg.ppo.adv_clip).any()  # some advantages at the clip
    loss.backward()
    g_ddpo = grads(trainer.policy)
    loss = loss.item()

    assert abs(float(stats["loss"]) - loss) <= 1e-5 * abs(loss), (float(stats["loss"]), loss)
    assert g_ddpo.abs().max() > 0
    torch.testing.assert_close(g_trainer, g_ddpo, rtol=0, atol=1e-5 * float(g_ddpo.abs().max()))
