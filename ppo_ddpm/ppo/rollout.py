"""Pass 1 pieces: start/step noise, the no-grad DDIM rollout loop, the no-grad ratio pass,
advantages. The loops are plain functions of static buffers, so the same code runs eagerly
(CPU) and inside a CUDA graph (``graphs.py``): identical maths on both paths.

One episode is the DDIM reverse process x_T -> x_0 with the plan's n steps (step i = i-th
network call, from timestep t_i). With the stored state x_i (``cache.state(i)``):

    eps_i    = policy(x_i, t_i, y)
    x_{i+1}  = mu_i + sigma_i z_i,       mu_i = DDIM mean (``ddpm.ddim``), z_i ~ N(0, I)
    action   = cache.state(i+1)          (x_{i+1} rounded to the cache's state dtype)
    logp_i   = log N(action; mu_i, s_i^2 I),  s_i = max(sigma_i, sigma_floor)

The log-prob is scored on the *stored* action by the very call the ratio pass makes
(``ddim_step(..., x_prev=action)``), so at unchanged parameters log r = logp_new - logp_old is
exactly 0, for fp32 and bf16 storage alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..ddpm.ddim import DDIMPlan


def kernel_ops(use_kernels: bool) -> SimpleNamespace:
    """The fused ops of ``ppo_ddpm.kernels`` (Triton on CUDA / under TRITON_INTERPRET, else their
    reference) when ``use_kernels``, else the pure-PyTorch references."""
    from .. import kernels as K

    if use_kernels:
        return SimpleNamespace(ddim_step=K.ddim_step, log_ratio=K.gaussian_log_ratio_from_logprob,
                               trajectory_ppo=K.trajectory_ppo)
    return SimpleNamespace(ddim_step=K.ddim_step_reference, log_ratio=K.gaussian_log_ratio_from_logprob_reference,
                           trajectory_ppo=K.trajectory_ppo_reference)


def check_sigma_floor(plan: DDIMPlan, sigma_floor: float) -> None:
    """Host-side, once: a step with sigma_t = 0 and no floor has no density (log-prob undefined).
    Raises ConfigError (a ValueError) naming ppo.sigma_floor."""
    if sigma_floor < 0:
        raise ConfigError(f"ppo.sigma_floor must be >= 0, got {sigma_floor}")
    zero = (plan.sigma.cpu() <= 0).nonzero().flatten().tolist()
    if zero and sigma_floor == 0:
        raise ConfigError(
            f"DDIM steps {zero} (timesteps {plan.timesteps.cpu()[zero].tolist()}) are deterministic (sigma_t = 0), "
            "so their log-probs are undefined and PPO ratios cannot be computed. Set ppo.sigma_floor > 0 "
            "(log-probs then use s_t = max(sigma_t, sigma_floor)), or make every step stochastic: "
            "sampling.eta > 0 and sampling.set_alpha_to_one: false"
        )


def derive_seed(*keys: int) -> int:
    """A 32-bit seed mixed from non-negative ints, e.g. (cfg.seed, iteration, rank): the rollout seed
    of one rank at one iteration (offset per rank, deterministic, resumable)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@dataclass
class RolloutNoise:
    """The randomness of one rollout: x_T [B, C, H, W], labels [B] | None, and the step noise.

    Step noise z_i [B, C, H, W] is drawn step by step from the rollout's generator into one
    [B, C, H, W] buffer (no [n, B, C, H, W] tensor is kept), in the fixed order x_T, labels,
    z_0 .. z_{n-1}. ``z`` [n, B, C, H, W] holds *explicit* step noise instead (tests, the
    single-process reproduction of a sharded batch); :meth:`draw` makes the very noise that
    ``PPOTrainer.rollout(seed)`` draws.
    """

    x_T: torch.Tensor
    labels: Optional[torch.Tensor]
    z: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, batch: int, shape, num_classes: int, device, dtype) -> "RolloutNoise":
        labels = torch.zeros(batch, dtype=torch.long, device=device) if num_classes > 0 else None
        return cls(torch.empty(batch, *shape, device=device, dtype=dtype), labels)

    def fill_start_(self, gen: torch.Generator, num_classes: int) -> "RolloutNoise":
        """Redraw x_T then the labels in place (static buffers of the CUDA graph) from ``gen``."""
        self.x_T.normal_(generator=gen)
        if self.labels is not None:
            self.labels.random_(0, num_classes, generator=gen)
        return self

    @classmethod
    def draw(cls, seed: int, batch: int, steps: int, shape, num_classes: int, device, dtype) -> "RolloutNoise":
        """Explicit noise from a generator seeded by ``seed``, in the rollout's order (x_T, labels, z_i)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        out = cls.empty(batch, shape, num_classes, device, dtype).fill_start_(gen, num_classes)
        out.z = torch.empty(steps, batch, *shape, device=device, dtype=dtype)
        for i in range(steps):
            out.z[i].normal_(generator=gen)
        return out

    def copy_start_(self, other: "RolloutNoise") -> "RolloutNoise":
        """Copy x_T and labels of explicit noise ``other`` into these static buffers."""
        if other.x_T.shape != self.x_T.shape:
            raise ValueError(f"rollout noise must have x_T {tuple(self.x_T.shape)}, got {tuple(other.x_T.shape)}")
        if (other.labels is None) != (self.labels is None):
            raise ValueError("rollout noise labels must be given iff model.num_classes > 0")
        self.x_T.copy_(other.x_T)
        if self.labels is not None:
            self.labels.copy_(other.labels)
        return self

    @classmethod
    def cat(cls, parts: list["RolloutNoise"]) -> "RolloutNoise":
        """Concatenate explicit shards along the batch: the global batch of several ranks' seeds."""
        labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
        return cls(torch.cat([p.x_T for p in parts]), labels, torch.cat([p.z for p in parts], 1))


def rollout_loop(policy, plan: DDIMPlan, cache, noise: RolloutNoise, step_noise: Callable[[int], torch.Tensor], ops,
                 *, clip_x0, sigma_floor: float, prediction_type: str = "epsilon") -> None:
    """Fill ``cache`` states 0..n and log-probs 0..n-1 (formulas in the module docstring).

    ``step_noise(i)`` gives z_i [B, C, H, W] (drawn in place into one buffer, or read from explicit
    noise). No host syncs and no data-dependent shapes: capturable in a CUDA graph.
    """
    B, dtype = noise.x_T.shape[0], noise.x_T.dtype
    cache.record_state(0, noise.x_T)
    x = cache.state(0).to(dtype)
    for i in range(plan.num_steps):
        t, *coefs = plan.step(i, B)
        eps = policy(x, t, noise.labels)
        x_next, _, _ = ops.ddim_step(x, eps, *coefs, noise=step_noise(i), clip_x0=clip_x0, sigma_floor=sigma_floor,
                                     prediction_type=prediction_type)
        cache.record_state(i + 1, x_next)
        action = cache.state(i + 1).to(dtype)
        _, _, log_prob = ops.ddim_step(x, eps, *coefs, x_prev=action, clip_x0=clip_x0, sigma_floor=sigma_floor,
                                       prediction_type=prediction_type)
        cache.record_logprob(i, log_prob)
        x = action


def ratio_loop(policy, plan: DDIMPlan, cache, rows: torch.Tensor, labels, first_step: int, out: torch.Tensor, ops,
               *, clip_x0, sigma_floor: float, dtype: torch.dtype, prediction_type: str = "epsilon") -> torch.Tensor:
    """No-grad ratio pass: out[j, b] = logp_theta(x_{i+1} | x_i) - logp_old[i], i = first_step + j, for the
    samples ``rows`` [m] (raw per-step log r, unclipped). ``out``: [n - first_step, m]. Capturable."""
    m = rows.shape[0]
    for j, i in enumerate(range(first_step, plan.num_steps)):
        x = cache.state(i).index_select(0, rows).to(dtype)
        action = cache.state(i + 1).index_select(0, rows).to(dtype)
        t, *coefs = plan.step(i, m)
        eps = policy(x, t, labels)
        _, _, log_prob = ops.ddim_step(x, eps, *coefs, x_prev=action, clip_x0=clip_x0, sigma_floor=sigma_floor,
                                       prediction_type=prediction_type)
        out[j].copy_(log_prob - cache.log_probs[i].index_select(0, rows))
    return out


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, ppo_cfg, tracker=None) -> torch.Tensor:
    """A_b from the (global) batch of rewards [N]: ``global`` (r - mean) / (std + eps), or ``group``
    (per-group running statistics of ``GroupStatTracker``), then clamped to +-adv_clip."""
    from ..rollout_cache import normalize_advantages

    if ppo_cfg.advantage == "global":
        return normalize_advantages(rewards, adv_clip=ppo_cfg.adv_clip)
    return tracker.update(group_ids, rewards, adv_clip=ppo_cfg.adv_clip)
