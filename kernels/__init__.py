"""Fused Triton kernels, importable as ``ppo_ddpm.kernels``.

Each op lives in its own file with a plain-PyTorch reference, an autograd.Function and a
functional API that runs Triton on CUDA (or under ``TRITON_INTERPRET=1``) and the
reference on CPU. ``*_bytes`` give the HBM bytes one call moves (for GB/s in benchmarks).
"""

from .ddim_step import bytes_moved as ddim_step_bytes
from .ddim_step import ddim_step, ddim_step_reference
from .gaussian_log_ratio import bytes_moved as gaussian_log_ratio_bytes
from .gaussian_log_ratio import (
    gaussian_log_ratio,
    gaussian_log_ratio_from_logprob,
    gaussian_log_ratio_from_logprob_reference,
    gaussian_log_ratio_reference,
)
from .ppo_trajectory import TrajectoryPPO, trajectory_ppo, trajectory_ppo_reference
from .ppo_trajectory import bytes_moved as trajectory_ppo_bytes

__all__ = [
    "ddim_step",
    "ddim_step_reference",
    "ddim_step_bytes",
    "gaussian_log_ratio",
    "gaussian_log_ratio_from_logprob",
    "gaussian_log_ratio_from_logprob_reference",
    "gaussian_log_ratio_reference",
    "gaussian_log_ratio_bytes",
    "TrajectoryPPO",
    "trajectory_ppo",
    "trajectory_ppo_reference",
    "trajectory_ppo_bytes",
]
