"""Pass 1 pieces: start/step noise, the no-grad DDIM rollout, the no-grad ratio pass, advantages.
The loops are plain functions of static buffers, so the same code runs eagerly (CPU) and inside a
CUDA graph (``graphs.py``): identical maths on both paths.

One episode is the DDIM reverse process x_T -> x_0 with the plan's n steps (step i = i-th network
call, from timestep t_i), run by ``ddpm.sample.ddim_loop``. State i, x_i, is x before call i: state 0
is the start x_T, unrounded in the policy dtype (the trainer's static buffer ``RolloutNoise.x_T``: it is
not stored in the cache, and every pass reads it from there, exactly); state i >= 1 is ``cache.state(i)``:

    eps_i    = policy(x_i, t_i, y)
    x_{i+1}  = mu_i + sigma_i z_i,       mu_i = DDIM mean (``ddpm.ddim``), z_i ~ N(0, I)
    logp_i   = log N(x_{i+1}; mu_i, s_i^2 I),  s_i = max(sigma_i, sigma_floor),  float64

x_{i+1} is written straight into the cache (its state dtype, f32 or bf16) by the one ``ddim_step``
call of the step, and logp_i scores the action as stored, so at unchanged parameters
log r = logp_new - logp_old is exactly 0, for f32 and bf16 storage alike. Only the stochastic steps
(sigma_i > 0, ``DDIMPlan.stochastic_steps``) are actions of the policy: a deterministic step
(sigma_i = 0, e.g. the last one with set_alpha_to_one) belongs to the environment and has no log-prob.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..ddpm.ddim import DDIMPlan
from ..ddpm.sample import ddim_loop


def kernel_ops(use_kernels: bool) -> SimpleNamespace:
    """The fused ops of ``ppo_ddpm.kernels`` (Triton on CUDA / under TRITON_INTERPRET, else their
    reference) when ``use_kernels``, else the pure-PyTorch references."""
    from .. import kernels

    if use_kernels:
        return SimpleNamespace(ddim_step=kernels.ddim_step, log_ratio=kernels.gaussian_log_ratio_from_logprob,
                               trajectory_ppo=kernels.trajectory_ppo)
    return SimpleNamespace(ddim_step=kernels.ddim_step_reference, log_ratio=kernels.gaussian_log_ratio_from_logprob_reference,
                           trajectory_ppo=kernels.trajectory_ppo_reference)


def check_policy_steps(plan: DDIMPlan, sigma_floor: float) -> list[int]:
    """Host-side, once: the stochastic steps of ``plan`` (the policy's actions). Raises ConfigError (a
    ValueError) when there are none: with every sigma_t = 0 (sampling.eta = 0) the sampler is
    deterministic and there is nothing for PPO to optimise."""
    if sigma_floor < 0:
        raise ConfigError(f"ppo.sigma_floor must be >= 0, got {sigma_floor}")
    steps = plan.stochastic_steps()
    if not steps:
        raise ConfigError(
            f"every DDIM step is deterministic (sigma_t = 0 at timesteps {plan.timesteps.cpu().tolist()}): the "
            "sampler has no randomness, so there is no policy to optimise. Set sampling.eta > 0 (1.0: DDPM-like), "
            "or ppo.sample_at_floor: true with ppo.sigma_floor > 0"
        )
    return steps


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


def rollout_loop(policy, plan: DDIMPlan, cache, noise: RolloutNoise, step_noise: Callable[[int], torch.Tensor], ops,
                 policy_steps: list[int], *, clip_x0, sigma_floor: float, prediction_type: str = "epsilon") -> None:
    """Fill ``cache`` states 1..n and the log-probs of ``policy_steps`` from ``noise.x_T`` (module docstring).

    ``step_noise(i)`` gives z_i [B, C, H, W] (drawn in place into one buffer, or read from explicit
    noise). No host syncs and no data-dependent shapes: capturable in a CUDA graph.
    """
    stochastic = set(policy_steps)

    def record(i, x, x_next, mu, log_prob):
        if i in stochastic:
            cache.record_logprob(i, log_prob)

    ddim_loop(policy, plan, noise.x_T, noise.labels, noise=step_noise, step_fn=ops.ddim_step,
              clip_x0=clip_x0, sigma_floor=sigma_floor, prediction_type=prediction_type, store=cache.state, visit=record)


def ratio_loop(policy, plan: DDIMPlan, cache, state: Callable[[int], torch.Tensor], rows: torch.Tensor, labels,
               steps: list[int], out: torch.Tensor, ops, *, clip_x0, sigma_floor: float, dtype: torch.dtype, divisor: int,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """No-grad ratio pass: out[j, b] = (logp_theta(x_{i+1} | x_i) - logp_old[i]) / divisor at the step
    i = steps[j], for the samples ``rows`` [m] (raw per-step log r, unclipped; divisor 1 for the sum
    reduction, D for the mean); ``state(i)`` is x_i [B, ...] (``PPOTrainer.state``: the rollout's start x_T
    for i = 0, else the cache's state i); ``cache`` gives the old log-probs. ``out``:
    [len(steps), m] float64. Capturable."""
    m = rows.shape[0]
    for j, i in enumerate(steps):
        x = state(i).index_select(0, rows).to(dtype)
        action = state(i + 1).index_select(0, rows).to(dtype)
        t, *coefs = plan.step(i, m)
        eps = policy(x, t, labels)
        _, _, log_prob = ops.ddim_step(x, eps, *coefs, x_prev=action, clip_x0=clip_x0, sigma_floor=sigma_floor,
                                       prediction_type=prediction_type)
        out[j].copy_((log_prob - cache.log_probs[i].index_select(0, rows)) / divisor)
    return out


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, ppo_cfg, tracker=None) -> torch.Tensor:
    """A_b from the (global) batch of rewards [N]: ``global`` (r - mean) / (std + eps), or ``group``
    (per-group running statistics of ``GroupStatTracker``), then clamped to +-adv_clip."""
    from ..rollout_cache import normalize_advantages

    if ppo_cfg.advantage == "global":
        return normalize_advantages(rewards, adv_clip=ppo_cfg.adv_clip)
    return tracker.update(group_ids, rewards, adv_clip=ppo_cfg.adv_clip)
