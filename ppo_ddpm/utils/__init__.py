"""Small shared helpers: seeding and device selection here; beside them ``checkpoint`` (atomic,
weights-only files), ``ema``, ``finite`` (the divergence guard), ``lock`` (one process per
output_dir), ``signals`` (stopping cleanly) and ``cli`` (exit codes and messages of the CLIs)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch on every device (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` must exist here
    (else ConfigError naming the key ``device``)."""
    from ..config import ConfigError, device_problem

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem:
        raise ConfigError(f"device = {name!r}: {problem}")
    return torch.device(name)
