"""Per-sample loss terms of the with-grad pass, and the trust-region diagnostics of an update.

Per-step log-ratios over the trained (stochastic) steps, l_{t,b} = (log pi_theta - log pi_old) / R with
R = 1 (``log_prob_reduction: sum``) or D pixels (``mean``, DDPO's per-pixel normalisation).

Trajectory objective (default):

    log r_b = clamp(sum_t clamp(l_{t,b}, -c, c), -C, C),   r_b = exp(log r_b)
    L       = -mean_b min(r_b A_b, clip(r_b, 1-e, 1+e) A_b)                     (value)
    dL/dl_{t,b} = w_b = -mask_b A_b r_b / B                                       (gradient)

mask_b by ``grad_mask`` (``kernels.trajectory_ppo``): ``strict``, nothing clipped (no per-step clip, no
global clip, r_b in [1-e, 1+e]); ``ppo``, standard PPO (autograd of the min form). Since w_b is the
same for every step t, the gradient of L is sum_t sum_b w_b dl_{t,b}/dtheta, which the trainer
accumulates one step at a time with :func:`trajectory_step_loss` (w detached).

Per-step objective (DDPO, Black et al. 2023), r_{t,b} = exp(clamp(l_{t,b}, -c, c)), c optional:

    L = mean_t [ -mean_b min(r_{t,b} A_b, clip(r_{t,b}, 1-e, 1+e) A_b) ]

KL to the frozen reference policy, closed form for two Gaussians of equal scale s_t:

    KL_t,b = ||mu_theta - mu_ref||^2 / (2 s_t^2 R)
    L_KL   = beta sum_t mean_b KL_t,b  (trajectory),   beta mean_t mean_b KL_t,b  (per_step)

i.e. each step's KL is weighted as the objective weighs that step's log-ratio, so kl_beta has one
meaning for both objectives.
"""
from __future__ import annotations

from typing import Optional

import torch


def trajectory_step_loss(log_ratio: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_b w_b l_{t,b}: its gradient is step t's share of dL/dtheta. log_ratio, weights: [m]."""
    return (weights.detach().to(log_ratio.dtype) * log_ratio).sum()


def per_step_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                       per_step_clip: Optional[float], grad_mask: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DDPO's per-step PPO term for one step of m samples, log_ratio [m] already per-step clipped.

    -> (value [m] = -min(r A, clip(r, 1-e, 1+e) A), surrogate [m] whose gradient is the ``grad_mask``
    rule's, counts {clipfrac, step_clipfrac, keep_frac: 0-d sums over the m samples}).
    ``ppo``: surrogate = value (autograd of the min form, DDPO's); ``strict``: -[nothing clipped] r A.
    A step-clipped entry (|l| at the clip) has zero gradient under both rules.
    """
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    value = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    outside = (ratio - 1).abs() > clip_range
    step_clipped = torch.zeros_like(outside) if per_step_clip is None else log_ratio.detach().abs() >= per_step_clip
    if grad_mask == "strict":
        keep = ~outside & ~step_clipped
        surrogate = -(keep * ratio * adv)
    else:
        keep = ~(((adv > 0) & (ratio > 1 + clip_range)) | ((adv < 0) & (ratio < 1 - clip_range))) & ~step_clipped
        surrogate = value
    counts = {"clipfrac": outside.sum().float(), "step_clipfrac": step_clipped.sum().float(), "keep_frac": keep.sum().float()}
    return value, surrogate, counts


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """||mu - mu_ref||^2 / (2 s^2) per sample [m]; mu, mu_ref [m, ...], s [m]."""
    d = (mu - mu_ref.detach()).flatten(1)
    return d.pow(2).sum(1) / (2 * s.to(d.dtype) ** 2)


KL_LOG_RATIO_CAP = 50.0  # |log r| cap inside approx_kl (exp(50) is finite; beyond, the estimate is meaningless anyway)


RATIO_STATS = ("clipfrac", "step_clipfrac", "global_clipfrac", "keep_frac", "log_ratio_raw_mean", "log_ratio_raw_abs_max",
               "approx_kl", "step_abs_log_ratio")


def trust_region_stats(log_ratio: torch.Tensor, steps: torch.Tensor, num_steps: int) -> dict[str, torch.Tensor]:
    """Diagnostics of per-step log-ratios l [K, m] (entry [k, b]: sample b at DDIM step steps[k, b]).

    With the trajectory log-ratio log r_b = sum_k l[k, b] (before any clip):

        log_ratio_raw_mean    = mean_b log r_b        log_ratio_raw_abs_max = max_b |log r_b|
        approx_kl             = mean_b (r_b - 1 - log r_b)   (k3 estimate of KL(old || new), log r capped at +-50)
        step_abs_log_ratio    [num_steps] = mean |l| of the entries at each DDIM step (0 where none)
    All float tensors on l's device (no host sync); see :func:`step_share`.
    """
    lr = log_ratio.double()
    total = lr.sum(0)
    capped = total.clamp(-KL_LOG_RATIO_CAP, KL_LOG_RATIO_CAP)
    flat_steps = steps.reshape(-1)
    abs_sum = torch.zeros(num_steps, dtype=torch.float64, device=lr.device).index_add_(0, flat_steps, lr.abs().reshape(-1))
    count = torch.bincount(flat_steps, minlength=num_steps).to(torch.float64)
    return {
        "log_ratio_raw_mean": total.mean().float(),
        "log_ratio_raw_abs_max": total.abs().max().float(),
        "approx_kl": (torch.expm1(capped) - capped).mean().float(),
        "step_abs_log_ratio": (abs_sum / count.clamp_min(1)).float(),
    }


def step_share(step_abs_log_ratio: torch.Tensor) -> tuple[float, int]:
    """(share of sum_i a_i carried by the largest a_i, its step index i) for a_i = mean |l| at step i;
    (0, -1) when every a_i is 0 (e.g. no update happened off-policy)."""
    total = float(step_abs_log_ratio.sum())
    if total <= 0:
        return 0.0, -1
    return float(step_abs_log_ratio.max()) / total, int(step_abs_log_ratio.argmax())
