"""The reward interface: ``RewardFn(x0, class_labels) -> r [B] float32``, frozen and without grad.

Output validation is shared with the trainer through :func:`check_reward`: a wrong shape or a
non-numeric result raises :class:`RewardError` naming the reward; NaN / inf values are *not* an
error here, they come back flagged in ``finite_mask`` so the trainer can skip the batch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


class RewardError(ValueError):
    """A reward cannot be built, or returned something that is not a [B] vector of numbers."""


def check_reward(r: Any, batch_size: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one batch of rewards -> (r float32 [B], finite_mask bool [B]).

    ``r`` may be a tensor, numpy array or sequence; it must have shape [batch_size] and a real
    dtype, else :class:`RewardError` naming ``source`` and the shape. Non-finite entries are kept
    and marked False in ``finite_mask``.
    """
    if not isinstance(r, torch.Tensor):
        try:
            r = torch.as_tensor(r)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(f"reward {source} returned {type(r).__name__}, not a tensor of numbers ({e})") from None
    if tuple(r.shape) != (batch_size,):
        raise RewardError(
            f"reward {source} returned shape {tuple(r.shape)} for a batch of {batch_size} images; "
            f"expected ({batch_size},): one scalar per image"
        )
    if r.is_complex():
        raise RewardError(f"reward {source} returned dtype {r.dtype}; expected real numbers")
    r = r.detach().to(torch.float32)
    return r, torch.isfinite(r)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    model.requires_grad_(False)
    return model


class RewardFn:
    """``r = fn(x0, class_labels)`` under ``torch.no_grad``, checked to be [B] float32 on x0's device.

    x0: [B, 3, S, S] in [-1, 1]. ``device``: where ``fn`` runs (its model's device); None: x0's.
    """

    def __init__(self, fn: Callable, name: str, device: Optional[torch.device] = None,
                 model: Optional[nn.Module] = None):
        self.fn, self.name, self.device, self.model = fn, name, device, model

    def __call__(self, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x0, torch.Tensor) or x0.dim() != 4 or x0.shape[1] != 3:
            shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise RewardError(f"reward {self.name}: expected x0 of shape [B, 3, S, S], got {shape}")
        out_device = x0.device
        if self.device is not None:
            x0 = x0.to(self.device)
            class_labels = None if class_labels is None else class_labels.to(self.device)
        with torch.no_grad():
            r = self.fn(x0, class_labels)
        r, _ = check_reward(r, x0.shape[0], self.name)
        return r.to(out_device)

    def __repr__(self) -> str:
        return f"RewardFn({self.name})"
