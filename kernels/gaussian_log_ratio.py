"""Per-step PPO log-ratio of two isotropic Gaussian policies sharing sigma, fused.

With s = max(sigma, sigma_floor) (sigma scalar or [B]), sums over the D non-batch elements and
R = 1 (``reduction='sum'``) or R = D (``'mean'``, DDPO's per-pixel normalisation):

    gaussian_log_ratio:              log r = (||x_prev - mu_old||^2 - ||x_prev - mu_new||^2) / (2 s^2 R)
    gaussian_log_ratio_from_logprob: log r = (log N(x_prev; mu_new, s^2 I) - old_log_prob) / R
                                           = (-||x_prev - mu_new||^2 / (2 s^2) - D log s - (D/2) log 2 pi - old_log_prob) / R
    per-step clip c (optional):      log r <- clamp(log r, -c, c)

Output [B] float32. Inputs [B, ...] in fp32/bf16/fp16 (may differ); ``old_log_prob`` [B] float64 (the
rollout cache's, ``ddpm.ddim.gaussian_log_prob``). Exactness: residuals x_prev - mu of the fp32/bf16
values are formed (exactly), squared and summed in float64, so a difference of two totals of ~1e4
(3x32x32, s = 0.01) keeps ~1e-11 absolute accuracy; the float32 output rounds log r once.

Gradient (w.r.t. mu_new only; x_prev, mu_old, old_log_prob and sigma are constants):

    d log r / d mu_new = keep_b (x_prev - mu_new) / (s^2 R),   keep_b = [|log r_b| <= c]

so the gradient flows when log r lies exactly on the clip boundary, like torch.clamp's, and is
zero only when the clip actually changed the value.

Cost: forward reads x_prev, mu_new (and mu_old) once; backward reads x_prev, mu_new and writes
the gradient once (see ``bytes_moved``). Launch: grid (nchunks, B) of BLOCK-element steps, then
one tiny finalize program per sample (see ``_dispatch``).
"""
from __future__ import annotations

import math

import torch

from ppo_ddpm.ddpm.ddim import gaussian_log_prob, squared_distance

from . import _dispatch
from ._dispatch import BLOCK, HAS_TRITON, NUM_WARPS, tl, triton

if HAS_TRITON:
    from ._dispatch import log_normalizer, store_cast

__all__ = [
    "gaussian_log_ratio",
    "gaussian_log_ratio_from_logprob",
    "gaussian_log_ratio_reference",
    "gaussian_log_ratio_from_logprob_reference",
    "bytes_moved",
]


REDUCTIONS = ("sum", "mean")


def _clip(log_ratio: torch.Tensor, per_step_clip: float | None) -> torch.Tensor:
    return log_ratio if per_step_clip is None else log_ratio.clamp(-per_step_clip, per_step_clip)


def _divisor(x: torch.Tensor, reduction: str) -> int:
    """R: 1 for 'sum', D (elements per sample) for 'mean'."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return x[0].numel() if reduction == "mean" else 1


def _sigma(sigma, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if s.dim() > 1 or (s.dim() == 1 and s.shape[0] != x.shape[0]):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(s.shape)}")
    return s.expand(x.shape[0])


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gaussian_log_ratio_reference(x_prev, mu_new, mu_old, sigma, *, sigma_floor=0.0, per_step_clip=None, reduction="sum") -> torch.Tensor:
    """Plain PyTorch: squared distances in float64 (``squared_distance``); [B] float32 (float64 for float64 inputs)."""
    R = _divisor(x_prev, reduction)
    s = _sigma(sigma, x_prev, torch.float32).clamp_min(sigma_floor).double()
    lr = (squared_distance(x_prev, mu_old) - squared_distance(x_prev, mu_new)) / (2 * s * s * R)
    return _clip(lr, per_step_clip).to(_out_dtype(x_prev, mu_new, mu_old))


def gaussian_log_ratio_from_logprob_reference(x_prev, mu_new, old_log_prob, sigma, *, sigma_floor=0.0, per_step_clip=None, reduction="sum") -> torch.Tensor:
    """Plain PyTorch via ``ddpm.ddim.gaussian_log_prob`` (float64); [B] float32 (float64 for float64 inputs)."""
    R = _divisor(x_prev, reduction)
    s = _sigma(sigma, x_prev, torch.float32).clamp_min(sigma_floor)
    lr = (gaussian_log_prob(x_prev, mu_new, s) - old_log_prob.double()) / R
    return _clip(lr, per_step_clip).to(_out_dtype(x_prev, mu_new))


def bytes_moved(x_prev: torch.Tensor, mu_new: torch.Tensor, mu_old: torch.Tensor | None = None, backward: bool = False) -> int:
    """HBM bytes of one call (per-sample [B] vectors ignored).

    forward: |x_prev| + |mu_new| (+ |mu_old|); backward: |x_prev| + 2 |mu_new| (reads x_prev, mu_new,
    writes d mu_new), with |t| = t.numel() * t.element_size().
    """
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    if backward:
        return nb(x_prev) + 2 * nb(mu_new)
    return nb(x_prev) + nb(mu_new) + (nb(mu_old) if mu_old is not None else 0)


if HAS_TRITON:

    @triton.jit
    def _partial_kernel(x_ptr, mn_ptr, mo_ptr, part_ptr, D, chunk_len, nchunks, BLOCK: tl.constexpr, HAS_MU_OLD: tl.constexpr):
        """part[b, c] (fp64) = sum over chunk c of (x-mo)^2 - (x-mn)^2 (or -(x-mn)^2 without mu_old)."""
        c = tl.program_id(0)
        b = tl.program_id(1)
        row = b.to(tl.int64) * D
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, chunk_len, BLOCK):
            idx = c * chunk_len + i + tl.arange(0, BLOCK)
            m = idx < D
            x = tl.load(x_ptr + row + idx, mask=m, other=0.0).to(tl.float64)
            d_new = x - tl.load(mn_ptr + row + idx, mask=m, other=0.0).to(tl.float64)  # exact residuals
            acc -= d_new * d_new
            if HAS_MU_OLD:
                d_old = x - tl.load(mo_ptr + row + idx, mask=m, other=0.0).to(tl.float64)
                acc += d_old * d_old
        tl.store(part_ptr + b * nchunks + c, tl.sum(acc, axis=0))

    @triton.jit
    def _finalize_kernel(part_ptr, sigma_ptr, old_ptr, out_ptr, scale_ptr, sigma_floor, clip, D, nchunks,
                         BLOCK_C: tl.constexpr, FROM_LOGPROB: tl.constexpr, MEAN: tl.constexpr):
        """out[b] = clamp(log r_b, -clip, clip); scale[b] = [|log r_b| <= clip] / (s_b^2 R); fp64 maths."""
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK_C)
        total = tl.sum(tl.load(part_ptr + b * nchunks + offs, mask=offs < nchunks, other=0.0), axis=0)
        s = tl.maximum(tl.load(sigma_ptr + b), sigma_floor).to(tl.float64)
        lr = total / (2.0 * s * s)
        if FROM_LOGPROB:
            lr = lr - log_normalizer(s, D) - tl.load(old_ptr + b)
        inv_s2 = 1.0 / (s * s)
        if MEAN:
            d = tl.full([], 0.0, tl.float64) + D
            lr = lr / d
            inv_s2 = inv_s2 / d
        lr = lr.to(tl.float32)
        keep = tl.abs(lr) <= clip
        tl.store(out_ptr + b, tl.minimum(tl.maximum(lr, -clip), clip))
        tl.store(scale_ptr + b, tl.where(keep, inv_s2, 0.0).to(tl.float32))

    @triton.jit
    def _backward_kernel(x_ptr, mn_ptr, g_ptr, scale_ptr, grad_ptr, D, chunk_len, BLOCK: tl.constexpr):
        """grad[b, i] = g[b] * scale[b] * (x[b, i] - mn[b, i]) in mu_new's dtype."""
        c = tl.program_id(0)
        b = tl.program_id(1)
        row = b.to(tl.int64) * D
        coef = tl.load(g_ptr + b) * tl.load(scale_ptr + b)
        for i in range(0, chunk_len, BLOCK):
            idx = c * chunk_len + i + tl.arange(0, BLOCK)
            m = idx < D
            x = tl.load(x_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            mn = tl.load(mn_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            store_cast(grad_ptr + row + idx, coef * (x - mn), m)


class _GaussianLogRatio(torch.autograd.Function):
    """Triton forward/backward; ``other`` is mu_old [B, ...] or old_log_prob [B] float64 (from_logprob)."""

    @staticmethod
    def forward(ctx, x_prev, mu_new, other, sigma, sigma_floor, per_step_clip, reduction, from_logprob):
        B, D = x_prev.shape[0], x_prev[0].numel()
        _divisor(x_prev, reduction)  # checks the name
        x = _dispatch.flat(x_prev, B, D, "x_prev")
        mn = _dispatch.flat(mu_new, B, D, "mu_new")
        if from_logprob:
            if other.shape != (B,):
                raise ValueError(f"old_log_prob must have shape [{B}], got {tuple(other.shape)}")
            mo, old = mn, other.double().contiguous()
        else:
            mo, old = _dispatch.flat(other, B, D, "mu_old"), None
        sig = _dispatch.per_sample(sigma, B, x.device, "sigma")
        sp = _dispatch.split(B, D, x.device)
        part = _dispatch.new_empty((B, sp.nchunks), torch.float64, x.device)
        _partial_kernel[(sp.nchunks, B)](x, mn, mo, part, D, sp.chunk_len, sp.nchunks, BLOCK=BLOCK, HAS_MU_OLD=not from_logprob, num_warps=NUM_WARPS)
        out = _dispatch.new_empty((B,), torch.float32, x.device)
        scale = _dispatch.new_empty((B,), torch.float32, x.device)
        clip = math.inf if per_step_clip is None else float(per_step_clip)
        _finalize_kernel[(B,)](
            part, sig, old if from_logprob else part, out, scale, float(sigma_floor), clip, D, sp.nchunks,
            BLOCK_C=sp.block_c, FROM_LOGPROB=from_logprob, MEAN=reduction == "mean", num_warps=1,
        )
        ctx.save_for_backward(x, mn, scale)
        ctx.split = sp
        return out

    @staticmethod
    def backward(ctx, g):
        x, mn, scale = ctx.saved_tensors
        B, D = x.shape[0], x[0].numel()
        grad = _dispatch.new_empty(mn.shape, mn.dtype, mn.device)
        sp = ctx.split
        _backward_kernel[(sp.nchunks, B)](x, mn, g.float().contiguous(), scale, grad, D, sp.chunk_len, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return None, grad, None, None, None, None, None, None


def gaussian_log_ratio(x_prev, mu_new, mu_old, sigma, *, sigma_floor=0.0, per_step_clip=None, reduction="sum") -> torch.Tensor:
    """Per-step log r [B] float32, differentiable w.r.t. mu_new (formula in the module docstring)."""
    if not _dispatch.use_triton(x_prev, mu_new, mu_old, sigma):
        return gaussian_log_ratio_reference(x_prev, mu_new, mu_old, sigma, sigma_floor=sigma_floor, per_step_clip=per_step_clip,
                                            reduction=reduction)
    _dispatch.no_grad_required(x_prev=x_prev, mu_old=mu_old, sigma=sigma)
    return _GaussianLogRatio.apply(x_prev, mu_new, mu_old, sigma, sigma_floor, per_step_clip, reduction, False)


def gaussian_log_ratio_from_logprob(x_prev, mu_new, old_log_prob, sigma, *, sigma_floor=0.0, per_step_clip=None, reduction="sum") -> torch.Tensor:
    """(log N(x_prev; mu_new, s^2 I) - old_log_prob) / R, clipped: [B] float32, differentiable w.r.t. mu_new."""
    if not _dispatch.use_triton(x_prev, mu_new, old_log_prob, sigma):
        return gaussian_log_ratio_from_logprob_reference(x_prev, mu_new, old_log_prob, sigma, sigma_floor=sigma_floor,
                                                         per_step_clip=per_step_clip, reduction=reduction)
    _dispatch.no_grad_required(x_prev=x_prev, old_log_prob=old_log_prob, sigma=sigma)
    return _GaussianLogRatio.apply(x_prev, mu_new, old_log_prob, sigma, sigma_floor, per_step_clip, reduction, True)
