"""Trajectory-level PPO objective from per-step log-ratios, fused into one pass over [T, B].

With per-step log-ratios l_{t,b} (raw), per-step clip c, global clip G, clip range e, advantages A_b:

    log r_b  = clamp(sum_t clamp(l_{t,b}, -c, c), -G, G)           (each clip optional)
    r_b      = exp(log r_b)
    loss     = -mean_b min(r_b A_b, clamp(r_b, 1 - e, 1 + e) A_b)   (min form)
    weights_b = -mask_b A_b r_b / B

Clips count as active only when they change the value (a value exactly on a boundary keeps its
gradient, like torch.clamp). ``weights`` IS the gradient used by the update pass, which trains with
sum_{t,b} weights_b * l_{t,b}(theta), l_{t,b} per-step clipped (zero gradient where that clip acts).
Two rules for mask_b (``grad_mask``):

- ``strict``: no |l_{t,b}| > c for any t, not |sum_t ...| > G, and 1 - e <= r_b <= 1 + e: the
  gradient flows only through samples where nothing was clipped.
- ``ppo``: autograd of the min form, i.e. standard PPO: not |sum_t ...| > G (the global clip bounds
  r), and not (A_b > 0 and r_b > 1 + e) and not (A_b < 0 and r_b < 1 - e); with the per-step clip of
  l_{t,b} this is exactly d loss / d l_{t,b}.

The Triton path returns detached tensors.

Stats (0-d tensors): clipfrac = mean_b [r_b outside [1-e, 1+e]], step_clipfrac = mean_{t,b}
[|l_{t,b}| > c], global_clipfrac = mean_b [|sum_t clamp(l)| > G].

Kernel: one program per BLOCK_B samples reads its [T, BLOCK_B] columns once in [BLOCK_T, BLOCK_B]
tiles, accumulates in fp64 (T*B values only), and writes the per-sample outputs plus its partial
stats; torch adds the per-program partials. Bytes moved: T*B*itemsize + B*4 read, 9*B written.
The kernel divides nothing: 1/B comes in as an fp64 scalar tensor (an fp64 division's slow path is a
call, which spilled 4-24 bytes on sm_90 for some tiles), and torch divides the step-clip count by T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _dispatch
from ._dispatch import HAS_TRITON, tl, triton

__all__ = ["TrajectoryPPO", "trajectory_ppo", "trajectory_ppo_reference", "bytes_moved"]

_STATS = ("clipfrac", "step_clipfrac", "global_clipfrac")
TILE = 512  # elements of l per program and loop step, fp64 in registers: 0 spills on sm_80/sm_90 with triton 3.6.0 .. 3.9.0
# for both grad masks (1024 spilled 16 bytes on sm_80 with 3.6.0 for grad_mask strict, 4096 everywhere; AOT-checked)
NUM_WARPS = 8  # 4 spills 12-24 bytes on sm_80/sm_90 for some tiles (python -m ppo_ddpm.kernels.aot)


@dataclass
class TrajectoryPPO:
    """loss: 0-d; log_ratio (clipped log r_b), weights: [B]; mask: [B] bool; stats: name -> 0-d tensor."""

    loss: torch.Tensor
    log_ratio: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    stats: dict[str, torch.Tensor]


GRAD_MASKS = ("strict", "ppo")


def _check(log_ratio_steps, advantages, clip_range, per_step_clip, global_clip, grad_mask="strict") -> None:
    if grad_mask not in GRAD_MASKS:
        raise ValueError(f"grad_mask must be one of {list(GRAD_MASKS)}, got {grad_mask!r}")
    if log_ratio_steps.dim() != 2 or log_ratio_steps.shape[0] < 1 or log_ratio_steps.shape[1] < 1:
        raise ValueError(f"log_ratio_steps must have shape [T, B] with T, B >= 1, got {tuple(log_ratio_steps.shape)}")
    B = log_ratio_steps.shape[1]
    if advantages.shape != (B,):
        raise ValueError(f"advantages must have shape [{B}], got {tuple(advantages.shape)}")
    if not (math.isfinite(clip_range) and clip_range >= 0):
        raise ValueError(f"clip_range must be finite and >= 0, got {clip_range}")
    for name, v in (("per_step_clip", per_step_clip), ("global_clip", global_clip)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0 or None, got {v}")


def bytes_moved(log_ratio_steps: torch.Tensor) -> int:
    """HBM bytes of one call: read [T, B] + advantages, write log_ratio, weights (f32) and mask (u8)."""
    T, B = log_ratio_steps.shape
    return T * B * log_ratio_steps.element_size() + 4 * B + 9 * B


def trajectory_ppo_reference(log_ratio_steps, advantages, *, clip_range, per_step_clip=None, global_clip=None,
                             grad_mask="strict") -> TrajectoryPPO:
    """Plain PyTorch in float32 (float64 for float64 inputs); loss and log_ratio keep autograd."""
    _check(log_ratio_steps, advantages, clip_range, per_step_clip, global_clip, grad_mask)
    dt = torch.promote_types(log_ratio_steps.dtype, torch.float32)
    lr, adv = log_ratio_steps.to(dt), advantages.to(dt)
    B = lr.shape[1]
    step_clipped = torch.zeros_like(lr, dtype=torch.bool) if per_step_clip is None else lr.abs() > per_step_clip
    total = (lr if per_step_clip is None else lr.clamp(-per_step_clip, per_step_clip)).sum(0)
    global_clipped = torch.zeros_like(total, dtype=torch.bool) if global_clip is None else total.abs() > global_clip
    log_ratio = total if global_clip is None else total.clamp(-global_clip, global_clip)
    ratio = log_ratio.exp()
    outside = (ratio < 1 - clip_range) | (ratio > 1 + clip_range)
    if grad_mask == "strict":
        mask = ~step_clipped.any(0) & ~global_clipped & ~outside
    else:
        mask = ~global_clipped & ~(((adv > 0) & (ratio > 1 + clip_range)) | ((adv < 0) & (ratio < 1 - clip_range)))
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv).mean()
    weights = (-(mask * adv) * ratio / B).detach()
    stats = {
        "clipfrac": outside.to(dt).mean(),
        "step_clipfrac": step_clipped.to(dt).mean(),
        "global_clipfrac": global_clipped.to(dt).mean(),
    }
    return TrajectoryPPO(loss, log_ratio, mask, weights, stats)


if HAS_TRITON:

    @triton.jit
    def _trajectory_kernel(
        lr_ptr, adv_ptr, logr_ptr, mask_ptr, w_ptr, part_ptr, inv_b_ptr,
        T, B, lo, hi, step_clip, global_clip,
        BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, STRICT: tl.constexpr,
    ):
        """Per-sample outputs for BLOCK_B samples; part[pid] = fp64 sums over them of (-surrogate,
        outside, step-clipped count, global-clipped) / B. l is read in its dtype, summed in fp64."""
        pid = tl.program_id(0)
        inv_b = tl.load(inv_b_ptr)  # fp64 1/B
        cols = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        valid = cols < B
        total = tl.zeros([BLOCK_B], dtype=tl.float64)
        nclip = tl.zeros([BLOCK_B], dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            m = (rows[:, None] < T) & valid[None, :]
            lr = tl.load(lr_ptr + rows[:, None].to(tl.int64) * B + cols[None, :], mask=m, other=0.0).to(tl.float64)
            nclip += tl.sum((tl.abs(lr) > step_clip).to(tl.int32), axis=0)
            total += tl.sum(tl.minimum(tl.maximum(lr, -step_clip), step_clip), axis=0)
        total32 = total.to(tl.float32)
        g_clipped = tl.abs(total32) > global_clip
        logr = tl.minimum(tl.maximum(total32, -global_clip), global_clip)
        ratio64 = tl.exp(logr.to(tl.float64))
        ratio = ratio64.to(tl.float32)
        outside = (ratio < lo) | (ratio > hi)
        adv = tl.load(adv_ptr + cols, mask=valid, other=0.0).to(tl.float64)
        if STRICT:
            keep = (nclip == 0) & (~g_clipped) & (~outside)
        else:
            keep = (~g_clipped) & ~(((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo)))
        r64 = ratio.to(tl.float64)
        surr = tl.minimum(r64 * adv, tl.minimum(tl.maximum(ratio, lo), hi).to(tl.float64) * adv)
        weights = tl.where(keep, -adv * r64 * inv_b, 0.0)
        tl.store(logr_ptr + cols, logr, mask=valid)
        tl.store(mask_ptr + cols, keep.to(tl.uint8), mask=valid)
        tl.store(w_ptr + cols, weights.to(tl.float32), mask=valid)
        zero = tl.zeros([BLOCK_B], dtype=tl.float64)
        tl.store(part_ptr + pid * 4 + 0, tl.sum(tl.where(valid, -surr, zero), axis=0) * inv_b)
        tl.store(part_ptr + pid * 4 + 1, tl.sum(tl.where(valid & outside, 1.0, zero), axis=0) * inv_b)
        tl.store(part_ptr + pid * 4 + 2, tl.sum(tl.where(valid, nclip.to(tl.float64), zero), axis=0) * inv_b)
        tl.store(part_ptr + pid * 4 + 3, tl.sum(tl.where(valid & g_clipped, 1.0, zero), axis=0) * inv_b)


def trajectory_ppo(log_ratio_steps, advantages, *, clip_range, per_step_clip=None, global_clip=None, grad_mask="strict") -> TrajectoryPPO:
    """Fused trajectory PPO reduction (module docstring); Triton outputs are detached."""
    if not _dispatch.use_triton(log_ratio_steps, advantages):
        return trajectory_ppo_reference(log_ratio_steps, advantages, clip_range=clip_range, per_step_clip=per_step_clip,
                                        global_clip=global_clip, grad_mask=grad_mask)
    _check(log_ratio_steps, advantages, clip_range, per_step_clip, global_clip, grad_mask)
    T, B = log_ratio_steps.shape
    lr = log_ratio_steps.detach().contiguous()
    adv = advantages.detach().float().contiguous()
    dev = lr.device
    block_b = min(triton.next_power_of_2(B), 256)
    block_t = min(triton.next_power_of_2(T), max(1, TILE // block_b))
    grid = triton.cdiv(B, block_b)
    new = _dispatch.new_empty
    logr, weights = (new((B,), torch.float32, dev) for _ in range(2))
    mask = new((B,), torch.uint8, dev)
    part = new((grid, 4), torch.float64, dev)
    inv_b = torch.full((1,), 1.0 / B, dtype=torch.float64, device=dev)  # correctly rounded, as an fp64 division
    _trajectory_kernel[(grid,)](
        lr, adv, logr, mask, weights, part, inv_b, T, B, 1 - clip_range, 1 + clip_range,
        math.inf if per_step_clip is None else float(per_step_clip), math.inf if global_clip is None else float(global_clip),
        BLOCK_T=block_t, BLOCK_B=block_b, STRICT=grad_mask == "strict", num_warps=NUM_WARPS,
    )
    sums = part.sum(0)
    stats = dict(zip(_STATS, (sums[1], sums[2] / T, sums[3])))
    return TrajectoryPPO(sums[0].float(), logr, mask.view(torch.bool), weights, {k: v.float() for k, v in stats.items()})
