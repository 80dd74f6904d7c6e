"""DDIM sampling (Song et al. 2021, eq. 12) with the Gaussian log-prob of each step.

For a step t -> t_prev with abar_t = alphas_cumprod[t] and abar_prev = alphas_cumprod[t_prev]
(or the final value when t_prev < 0), the network output o becomes (x0_hat, eps_hat) by its
``prediction_type`` (as diffusers' DDIMScheduler; v: Salimans & Ho 2022):

    epsilon:       x0_hat = (x_t - sqrt(1 - abar_t) o) / sqrt(abar_t),   eps_hat = o
    sample:        x0_hat = o,                                          eps_hat = (x_t - sqrt(abar_t) o) / sqrt(1 - abar_t)
    v_prediction:  x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) o,      eps_hat = sqrt(abar_t) o + sqrt(1 - abar_t) x_t

then (eps_hat from the unclamped x0_hat; x0_hat clamped to [-c, c] if clip_x0):

    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    mu_t    = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat
    x_prev  = mu_t + sigma_t z,   z ~ N(0, I)

The policy's log-prob of the action x_prev uses s_t = max(sigma_t, sigma_floor):

    log pi(x_prev | x_t) = -||x_prev - mu_t||^2 / (2 s_t^2) - D log s_t - (D / 2) log(2 pi)

summed over the D = C*H*W pixels (``reduction='mean'`` divides by D). Log-probs are float64: the
residual x_prev - mu_t of the float32/bf16 values is formed, squared and summed in float64, so the
difference of two log-probs of the same action (a PPO log-ratio, ~1e4 - 1e4 at 3x32x32 and s = 0.01)
keeps ~1e-11 absolute accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LOG_2PI = math.log(2 * math.pi)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # index = the fused kernel's PRED constexpr


def prediction_index(prediction_type: str) -> int:
    """Position of ``prediction_type`` in PREDICTION_TYPES; an unknown name is a ValueError naming the key."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
    return PREDICTION_TYPES.index(prediction_type)


def x0_eps_from_output(x_t: torch.Tensor, out: torch.Tensor, abar_t, prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) of the network output ``out`` at x_t (module docstring); abar_t broadcastable
    against x_t. Computed in the inputs' dtype."""
    sqrt_a, sqrt_1ma = abar_t.sqrt(), (1 - abar_t).sqrt()
    pred = prediction_index(prediction_type)
    if pred == 0:  # epsilon
        return (x_t - sqrt_1ma * out) / sqrt_a, out
    if pred == 1:  # sample
        return out, (x_t - sqrt_a * out) / sqrt_1ma
    return sqrt_a * x_t - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x_t


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """Descending DDIM timesteps [n], as diffusers' ``DDIMScheduler.set_timesteps``.

    leading:  t_i = i * (T // n) + steps_offset, i = n-1..0
    trailing: t_i = round(T - i * T / n) - 1, i = 0..n-1
    linspace: t_i = round(linspace(0, T - 1, n))_i, i = n-1..0
    (steps_offset applies to ``leading`` only, as in diffusers.)
    """
    n, T = num_inference_steps, num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"sampling.num_inference_steps must be in [1, {T}], got {n}")
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"sampling.spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"sampling.steps_offset={steps_offset} puts DDIM timesteps {ts.tolist()} outside [0, {T - 1}]")
    return torch.from_numpy(ts.copy())


def ddim_sigma(abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))."""
    var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return eta * var.clamp_min(0).sqrt()


@dataclass
class DDIMPlan:
    """Per-inference-step tensors of one DDIM trajectory (all shape [n], step i = i-th network call).

    timesteps, prev_timesteps: int64; abar_t, abar_prev, sigma: float32.
    """

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    abar_t: torch.Tensor
    abar_prev: torch.Tensor
    sigma: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @classmethod
    def from_config(cls, cfg) -> "DDIMPlan":
        """The plan of a run's :class:`~ppo_ddpm.config.Config`: schedule, sampling, and with
        ``ppo.sample_at_floor`` the DDIM sigmas raised to ``ppo.sigma_floor`` (CPU)."""
        from .schedules import NoiseSchedule

        s = cfg.sampling
        return make_ddim_plan(NoiseSchedule.from_config(cfg.schedule).alphas_cumprod, s.num_inference_steps, s.eta, s.spacing,
                              s.set_alpha_to_one, s.steps_offset, min_sigma=cfg.ppo.sigma_floor if cfg.ppo.sample_at_floor else 0.0)

    def stochastic_steps(self) -> list[int]:
        """Steps i with sigma_i > 0: the policy's actions. A step with sigma_i = 0 is deterministic
        (x_{i+1} = mu_i): part of the environment, with no log-prob."""
        return [i for i, sig in enumerate(self.sigma.tolist()) if sig > 0]

    def step(self, i, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, abar_t, abar_prev, sigma) of step ``i`` (an int, or an index tensor [batch] for one step
        per sample), each expanded to [batch]: per-sample inputs of the model and the DDIM step."""
        return tuple(getattr(self, f)[i].expand(batch) for f in ("timesteps", "abar_t", "abar_prev", "sigma"))

    def to(self, device) -> "DDIMPlan":
        return DDIMPlan(*(getattr(self, f).to(device) for f in ("timesteps", "prev_timesteps", "abar_t", "abar_prev", "sigma")))


def make_ddim_plan(alphas_cumprod: torch.Tensor, num_inference_steps: int, eta: float, spacing: str = "leading",
                   set_alpha_to_one: bool = True, steps_offset: int = 0, min_sigma: float = 0.0) -> DDIMPlan:
    """Build the n-step plan from abar [T] (float64 maths, float32 result), as diffusers' DDIMScheduler:
    t_prev = t - T // n for every spacing; abar_prev = 1 (``set_alpha_to_one``) or abar_0 when t_prev < 0.

    ``min_sigma`` > 0 samples every step with sigma_i = max(sigma_i, min_sigma) (DPPO's minimum policy
    std): the mean's eps coefficient sqrt(max(1 - abar_prev - sigma^2, 0)) follows, and no step is
    deterministic any more."""
    T = alphas_cumprod.numel()
    ac = alphas_cumprod.detach().double().cpu()
    ts = ddim_timesteps(num_inference_steps, T, spacing, steps_offset)
    prev = ts - T // num_inference_steps
    final = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ac[0]
    abar_t = ac[ts]
    abar_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], final)
    sigma = ddim_sigma(abar_t, abar_prev, eta).clamp_min(min_sigma)
    return DDIMPlan(ts, prev, abar_t.float(), abar_prev.float(), sigma.float())


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for low-precision inputs, float64 when any input is float64."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """Scalar or [B] -> [B, 1, ..., 1] in x's dtype, broadcastable against x [B, ...]."""
    v = torch.as_tensor(v, device=x.device).to(x.dtype)
    if v.dim() == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def squared_distance(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """||x - mean||^2 per sample [B] float64: residual, square and sum in float64 (the difference of two
    float32/bf16 values is exact in float64)."""
    return (x.double() - mean.double()).flatten(1).pow(2).sum(1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, s, reduction: str = "sum") -> torch.Tensor:
    """log N(x; mean, s^2 I) per sample [B] float64 (module docstring); s scalar or [B]."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    sq = squared_distance(x, mean)
    s = torch.as_tensor(s, device=x.device).double().expand(x.shape[0])
    D = x[0].numel()
    lp = -sq / (2 * s * s) - D * torch.log(s) - 0.5 * D * LOG_2PI
    return lp / D if reduction == "mean" else lp


def ddim_step_reference(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t,
    abar_prev,
    sigma,
    noise: torch.Tensor | None = None,
    x_prev: torch.Tensor | None = None,
    clip_x0: float | None = None,
    sigma_floor: float = 0.0,
    reduction: str = "sum",
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step with its log-prob (plain PyTorch; the reference of the fused kernel).

    x_t, eps: [B, C, H, W], ``eps`` being the network output read as ``prediction_type`` (epsilon,
    sample or v_prediction); abar_t, abar_prev, sigma: scalars or [B] (per-sample, no host sync).
    Give ``noise`` to sample x_prev = mu + sigma * noise, or ``x_prev`` to score a cached action.
    ``out`` (sampling only): a buffer of any float dtype (e.g. a bf16 cache state) that receives x_prev.
    Returns (x_prev [B, ...] in out's dtype or x_t's, mu [B, ...] in x_t's dtype, log_prob [B] float64);
    the log-prob scores x_prev as returned, i.e. after rounding to its dtype. Maths in float32, or
    float64 when x_t or eps is float64; log-prob sums in float64 (``gaussian_log_prob``).
    """
    if noise is not None and x_prev is not None:
        raise ValueError("give either noise or x_prev, not both")
    if out is not None and x_prev is not None:
        raise ValueError("out receives a sampled x_prev; it cannot be given with x_prev")
    dt = _compute_dtype(x_t, eps)
    x32, e32 = x_t.to(dt), eps.to(dt)
    a_t, a_p, sig = _per_sample(abar_t, x32), _per_sample(abar_prev, x32), _per_sample(sigma, x32)
    x0, eps_hat = x0_eps_from_output(x32, e32, a_t, prediction_type)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = a_p.sqrt() * x0 + (1 - a_p - sig * sig).clamp_min(0).sqrt() * eps_hat
    if x_prev is None:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        x_prev = (mean + sig * noise.to(dt)).to(x_t.dtype if out is None else out.dtype)
        if out is not None:
            x_prev = out.copy_(x_prev)
    s = sig.reshape(-1).float().clamp_min(sigma_floor)  # s = max(sigma, sigma_floor) in float32, as the kernels and log-ratios
    log_prob = gaussian_log_prob(x_prev, mean, s, reduction)
    return x_prev.to(x_t.dtype) if out is None else x_prev, mean.to(x_t.dtype), log_prob
