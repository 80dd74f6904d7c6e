"""Per-sample loss terms of the with-grad pass (everything here is differentiable autograd maths).

Trajectory objective (default), for sample b with per-step log-ratios l_{t,b} over the trained steps:

    log r_b = clamp(sum_t clamp(l_{t,b}, -c, c), -C, C),   r_b = exp(log r_b)
    L       = -mean_b min(r_b A_b, clip(r_b, 1-e, 1+e) A_b)                     (value)
    dL/dl_{t,b} = w_b = -mask_b A_b r_b / B                                       (gradient)

mask_b: no per-step clip in any step, no global clip, r_b in [1-e, 1+e] (``kernels.trajectory_ppo``).
Since w_b is the same for every step t, the gradient of L is sum_t sum_b w_b dl_{t,b}/dtheta, which the
trainer accumulates one step at a time with :func:`trajectory_step_loss` (w detached).

Per-step objective (DDPO, Black et al. 2023), r_{t,b} = exp(clamp(l_{t,b}, -c, c)):

    L = mean_t [ -mean_b min(r_{t,b} A_b, clip(r_{t,b}, 1-e, 1+e) A_b) ]

KL to the frozen reference policy, closed form for two Gaussians of equal scale s_t:

    KL_t,b = ||mu_theta - mu_ref||^2 / (2 s_t^2),   L_KL = beta * sum_t mean_b KL_t,b
"""
from __future__ import annotations

import torch


def trajectory_step_loss(log_ratio: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_b w_b l_{t,b}: its gradient is step t's share of dL/dtheta. log_ratio, weights: [m]."""
    return (weights.detach().to(log_ratio.dtype) * log_ratio).sum()


def ppo_clip_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """-min(r A, clip(r, 1-e, 1+e) A) per sample [m] (PPO's pessimistic surrogate), r = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """||mu - mu_ref||^2 / (2 s^2) per sample [m]; mu, mu_ref [m, ...], s [m]."""
    d = (mu - mu_ref.detach()).flatten(1)
    return d.pow(2).sum(1) / (2 * s.to(d.dtype) ** 2)
