"""Noise schedules beta_1..beta_T, computed in float64 and stored as float32 buffers.

- ``linear`` (Ho et al. 2020): beta_t = linspace(beta_start, beta_end, T).
- ``scaled_linear`` (Stable Diffusion): beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2.
- ``cosine`` (Nichol & Dhariwal 2021, diffusers' ``squaredcos_cap_v2``):
  abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2),  beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999).

alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s (``alphas_cumprod``).

Pretraining target of each ``model.prediction_type`` (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps):
epsilon -> eps, sample -> x_0, v_prediction -> v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ScheduleConfig
from .ddim import prediction_index


def make_betas(kind: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T as a float64 tensor of shape [T]."""
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
    if kind == "cosine":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((t + 1) / T) / abar(t / T), 0.999) for t in range(T)], dtype=torch.float64)
    raise ValueError(f"schedule.kind must be 'linear', 'scaled_linear' or 'cosine', got {kind!r}")


class NoiseSchedule(nn.Module):
    """Buffers ``betas`` and ``alphas_cumprod`` [T] (float32, from float64 maths)."""

    def __init__(self, kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        self.num_train_timesteps = num_train_timesteps
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        return cls(cfg.kind, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)

    def _abar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """abar_t of per-sample t [B], shaped [B, 1, ...] to broadcast against x [B, ...]."""
        return self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with per-sample t [B]."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_target(self, prediction_type: str, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at ``q_sample(x0, t, noise)`` (module docstring), [B, ...]."""
        prediction_index(prediction_type)  # an unknown name: ValueError naming model.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        abar = self._abar(t, x0)  # v_prediction
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
