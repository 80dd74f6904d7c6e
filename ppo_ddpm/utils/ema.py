"""Exponential moving average of a model's weights (pretraining and the PPO trainer share it).

    theta_ema <- decay * theta_ema + (1 - decay) * theta     (every parameter)
    b_ema     <- b                                            (every buffer, copied)
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """One EMA step of ``ema_model`` towards ``model`` (same architecture), in place."""
    ema_params = list(ema_model.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"ema_update_: the EMA model has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema + (1 - decay) (p - ema)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)
