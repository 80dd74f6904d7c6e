"""Non-finite values: the divergence guard (a run whose parameters or loss stop being finite stops with
a named error), and how a report writes a number that may be NaN / inf (JSON null, ``n/a``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class DivergenceError(RuntimeError):
    """The parameters or the loss of a run became NaN / inf; the message says where and what was kept."""


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` holding a NaN or inf (one host sync when all are finite)."""
    named = list(model.named_parameters())
    if not named or bool(torch.stack([p.detach().isfinite().all() for _, p in named]).all()):
        return []
    return [n for n, p in named if not bool(p.detach().isfinite().all())]


def divergence(model: nn.Module, loss: Optional[float] = None, nonfinite_samples: float = 0) -> Optional[str]:
    """What is not finite: parameters of ``model``, the ``loss``, the model's samples (a count); None when all is."""
    bad = nonfinite_parameters(model)
    parts = []
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        parts.append(f"non-finite parameters {', '.join(bad[:5])}{more}")
    if loss is not None and not math.isfinite(loss):
        parts.append(f"loss {loss}")
    if nonfinite_samples:
        parts.append(f"{int(nonfinite_samples)} samples with NaN/inf pixels")
    return "; ".join(parts) or None


def finite_or_none(v: float) -> Optional[float]:
    """``v``, or None (JSON null) when it is NaN / inf."""
    return v if math.isfinite(v) else None


def format_number(v: Optional[float], spec: str) -> str:
    """``format(v, spec)``, or ``n/a`` for None (a value that was not finite)."""
    return "n/a" if v is None else format(v, spec)
