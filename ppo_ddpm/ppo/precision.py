"""How the policy UNet runs: ``ppo.precision`` (fp32 | bf16), ``ppo.tf32`` and ``ppo.channels_last``.

    run = UNetPrecision.from_config(cfg.ppo, device)
    run.prepare(policy)                         # channels_last weights (CUDA and ppo.channels_last only)
    eps = run.forward(policy, x, t, labels)     # [B, C, H, W] in x's dtype, contiguous
    with run.backend(): loss.backward()         # the backward's matmuls / convs under the same TF32 setting

- ``bf16``: ``torch.autocast(device, bfloat16)`` around the UNet forward only, so its convs and matmuls
  (and, by autograd, their backward) run in bf16 with fp32 accumulation, normalisations and softmax in
  fp32 (autocast's op lists). The output is cast back to x's dtype (the policy's, fp32) before it leaves
  ``forward``: the DDIM step, the float64 log-probs and the log-ratios never see bf16 arithmetic. The
  weight cache of autocast is off (a CUDA graph may capture the forward; every weight is cast once per
  forward anyway).
- ``fp32``: no autocast. On CUDA, ``ppo.tf32`` lets cuBLAS and cuDNN use TF32 tensor cores (10-bit
  mantissa inputs, fp32 accumulation) for the fp32 convs and matmuls of the forward and backward
  (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.backends.cudnn.allow_tf32``, set inside
  ``backend()`` and restored after, so nothing else in the process is affected); with ``tf32: false``
  both are off (exact fp32). CPU: no effect.
- ``channels_last`` (CUDA): the UNet's 4-D weights and its input in NHWC memory format (what cuDNN's
  tensor-core convolutions read natively); the output is made contiguous again. CPU: no effect.

What bf16 changes. The policy is then the autocast network: the rollout samples from its mean and every
pass scores with it, so log r is exact for that policy, and where the trainer promises r = 1 (its ratio
pass is skipped while the parameters are the rollout's) r is 1 without a forward. Repeating a forward
gives the same eps bit for bit only when it runs the same kernels: the same batch composition (the
rollout's B rows, in order) does; another one (a minibatch's rows, a micro-batch mixing steps) may not on
a GPU, where cuDNN / cuBLAS choose kernels by shape. There a ratio pass forced at unchanged parameters,
or the ``per_step`` objective's with-grad log-ratio of the first minibatch, is not 0 but rounding noise
of about sqrt(D) |delta mu| / s per step: bf16 moves the mean by ~2^-8 relative instead of fp32's ~2^-24,
and the summed log-density over D pixels amplifies that by sqrt(D) / s. (On the CPU, measured on the
embedded UNet, the forward was batch-independent in bf16; tests/test_precision.py pins the same-batch case.)
The bf16 and fp32 policies differ by as much (0.26 .. 0.75 in per-step log-density at 3x16x16, s >= 0.1,
measured): never mix them within one rollout and its update (the trainer does not).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class UNetPrecision:
    """autocast: torch.bfloat16 or None (fp32); tf32, channels_last: in effect (CUDA only)."""

    device_type: str
    autocast: Optional[torch.dtype] = None
    tf32: bool = False
    channels_last: bool = False

    @classmethod
    def from_config(cls, ppo_cfg, device) -> "UNetPrecision":
        cuda = torch.device(device).type == "cuda"
        return cls(torch.device(device).type, torch.bfloat16 if ppo_cfg.precision == "bf16" else None,
                   tf32=cuda and ppo_cfg.tf32, channels_last=cuda and ppo_cfg.channels_last)

    def prepare(self, *models: Optional[nn.Module]) -> None:
        """Put the 4-D weights of ``models`` in channels_last format (in place) when that is on."""
        if self.channels_last:
            for m in models:
                if m is not None:
                    m.to(memory_format=torch.channels_last)

    @contextlib.contextmanager
    def backend(self) -> Iterator[None]:
        """CUDA: cuBLAS / cuDNN TF32 as ``tf32`` says, restored on exit. CPU: nothing."""
        if self.device_type != "cuda":
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """eps = model(x, t, labels) [B, C, H, W] under this precision, in x's dtype and contiguous."""
        if self.channels_last:
            x_in = x.contiguous(memory_format=torch.channels_last)
        else:
            x_in = x
        with self.backend(), torch.autocast(self.device_type, dtype=self.autocast or torch.bfloat16,
                                            enabled=self.autocast is not None, cache_enabled=False):
            eps = model(x_in, t, labels)
        return eps.to(x.dtype, memory_format=torch.contiguous_format)

    def bind(self, model: nn.Module):
        """``model`` as a callable (x, t, labels) -> eps under this precision (for ``ddim_loop``)."""
        return lambda x, t, labels=None: self.forward(model, x, t, labels)
