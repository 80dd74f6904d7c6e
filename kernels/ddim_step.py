"""One DDIM step (Song et al. 2021, eq. 12) and the Gaussian log-prob of its action, fused.

Per sample b (abar_t, abar_prev, sigma: scalars or [B], coefficients computed in the kernel), the
model output o ("eps") read as ``prediction_type`` (constexpr PRED; formulas in ``ppo_ddpm.ddpm.ddim``):

    (x0_raw, eps_hat) = epsilon: ((x_t - sqrt(1 - abar_t) o) / sqrt(abar_t), o)
                        sample:  (o, (x_t - sqrt(abar_t) o) / sqrt(1 - abar_t))
                        v:       (sqrt(abar_t) x_t - sqrt(1 - abar_t) o, sqrt(abar_t) o + sqrt(1 - abar_t) x_t)
    x0     = clamp(x0_raw, -clip_x0, clip_x0)   (no clamp if None)
    mean   = sqrt(abar_prev) x0 + sqrt(max(1 - abar_prev - sigma^2, 0)) eps_hat
    x_prev = mean + sigma noise            (sampling, rounded to its buffer's dtype; or the given x_prev is scored)
    log_prob = -||x_prev - mean||^2 / (2 s^2) - D log s - (D/2) log 2 pi,   s = max(sigma, sigma_floor)

Reference: ``ppo_ddpm.ddpm.ddim.ddim_step_reference`` (same maths, same dtypes: mean in x_t's dtype,
x_prev in x_t's dtype or in the dtype of the ``out`` buffer it is written to, e.g. a bf16 cache state;
log_prob [B] float64 of x_prev as stored: the fp32 residual squared and summed in float64, so that PPO
log-ratios, differences of two such log-probs, stay exact). Inputs fp32/bf16/fp16.

Gradient w.r.t. the model output o only (x_t, noise, x_prev and the schedule are constants), with
dir_b = sqrt(max(1 - abar_prev - sigma^2, 0)), a = abar_t, and the per-sample constants
c_x0 = sqrt(abar_prev) d x0_raw / d o, c_eps = dir_b d eps_hat / d o:

    epsilon: c_x0 = -sqrt(abar_prev) sqrt(1 - a) / sqrt(a),  c_eps = dir_b
    sample:  c_x0 = sqrt(abar_prev),                       c_eps = -dir_b sqrt(a) / sqrt(1 - a)
    v:       c_x0 = -sqrt(abar_prev) sqrt(1 - a),           c_eps = dir_b sqrt(a)
    d mean / d o = c_eps + c_x0 [|x0_raw| <= clip_x0]      (clamp passes the gradient at the boundary)
    d log_prob / d mean = (x_prev - mean) / s^2           (scoring a given x_prev)
    d log_prob / d eps = 0                                 (sampling: x_prev - mean = sigma noise)
    d x_prev / d eps = d mean / d eps                      (sampling)

Cost (``bytes_moved``): sampling reads x_t, eps, noise and writes x_prev, mean; scoring reads x_t,
eps, x_prev and writes mean. Backward reads the output gradients (plus x_t, eps when clip_x0 is set
or log_prob is differentiated through a given x_prev, plus x_prev then) and writes d eps.
Launch: grid (nchunks, B) of BLOCK-element steps, each writing its fp64 partial sum of squares, then one
tiny finalize program per sample adding them in a fixed order.
"""
from __future__ import annotations

import math

import torch

from ppo_ddpm.ddpm.ddim import ddim_step_reference, prediction_index

from . import _dispatch
from ._dispatch import BLOCK, HAS_TRITON, NUM_WARPS, tl, triton

if HAS_TRITON:
    from ._dispatch import cast_rne, log_normalizer, store_cast

__all__ = ["ddim_step", "ddim_step_reference", "bytes_moved"]


def bytes_moved(x_t: torch.Tensor, eps: torch.Tensor, other: torch.Tensor, score: bool, backward: bool = False, clip_x0: bool = False) -> int:
    """HBM bytes of one call ([B] vectors ignored); ``other`` is the noise (sampling) or x_prev (scoring).

    forward:  |x_t| + |eps| + |other| + |mean| (+ |x_prev| written when sampling); outputs in x_t's dtype.
    backward, scoring (PPO update: gradient through log_prob): |x_t| + |eps| + |x_prev| + |d eps|.
    backward, sampling (gradient through mean): |d mean| + |d eps| (+ |x_t| + |eps| with clip_x0).
    """
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    if not backward:
        return nb(x_t) + nb(eps) + nb(other) + nb(x_t) * (1 if score else 2)
    if score:
        return nb(x_t) + 2 * nb(eps) + nb(other)
    return nb(x_t) + nb(eps) + (nb(x_t) + nb(eps) if clip_x0 else 0)


if HAS_TRITON:

    @triton.jit
    def _coefficients(abar_t_ptr, abar_prev_ptr, sigma_ptr, b, PRED: tl.constexpr):
        """fp64 per-sample maths, rounded once: sqrt(1-a_t), sqrt(a_t), sqrt(a_p), dir, c_x0, c_eps, sigma."""
        a_t = tl.load(abar_t_ptr + b).to(tl.float64)
        a_p = tl.load(abar_prev_ptr + b).to(tl.float64)
        sig = tl.load(sigma_ptr + b)
        s64 = sig.to(tl.float64)
        sqrt_1m_at = tl.sqrt(1.0 - a_t)
        sqrt_at = tl.sqrt(a_t)
        sqrt_ap = tl.sqrt(a_p)
        dir_coef = tl.sqrt(tl.maximum(1.0 - a_p - s64 * s64, 0.0))
        if PRED == 0:  # epsilon
            c_x0 = -(sqrt_ap * sqrt_1m_at / sqrt_at)
            c_eps = dir_coef
        elif PRED == 1:  # sample
            c_x0 = sqrt_ap
            c_eps = -(dir_coef * sqrt_at / sqrt_1m_at)
        else:  # v_prediction
            c_x0 = -(sqrt_ap * sqrt_1m_at)
            c_eps = dir_coef * sqrt_at
        return (sqrt_1m_at.to(tl.float32), sqrt_at.to(tl.float32), sqrt_ap.to(tl.float32), dir_coef.to(tl.float32),
                c_x0.to(tl.float32), c_eps.to(tl.float32), sig)

    @triton.jit
    def _x0_eps(x, o, sqrt_1m_at, sqrt_at, PRED: tl.constexpr):
        """(x0_raw, eps_hat) of the model output o at x_t (module docstring), fp32."""
        if PRED == 0:  # epsilon
            x0 = tl.div_rn(x - sqrt_1m_at * o, sqrt_at)
            e = o
        elif PRED == 1:  # sample
            x0 = o
            e = tl.div_rn(x - sqrt_at * o, sqrt_1m_at)
        else:  # v_prediction
            x0 = sqrt_at * x - sqrt_1m_at * o
            e = sqrt_at * o + sqrt_1m_at * x
        return x0, e

    @triton.jit
    def _forward_kernel(
        x_ptr, eps_ptr, z_ptr, xprev_ptr, mean_ptr, part_ptr, abar_t_ptr, abar_prev_ptr, sigma_ptr,
        clip, D, chunk_len, nblocks, BLOCK: tl.constexpr, SCORE: tl.constexpr, PRED: tl.constexpr,
    ):
        """mean (and x_prev = mean + sigma z when sampling, rounded to x_prev's dtype); part[b, k] = fp64 sum of
        (x_prev - mean)^2 over BLOCK k of sample b, x_prev as stored. z is the noise (sampling) or the given
        x_prev (SCORE). No fp64 value is carried across loop steps: a [BLOCK] fp64 accumulator spilled on
        sm_90 with triton 3.9, a scalar one with triton 3.6 (AOT-checked)."""
        c = tl.program_id(0)
        b = tl.program_id(1)
        row = b.to(tl.int64) * D
        sqrt_1m_at, sqrt_at, sqrt_ap, dir_coef, _c_x0, _c_eps, sig = _coefficients(abar_t_ptr, abar_prev_ptr, sigma_ptr, b, PRED)
        for i in range(0, chunk_len, BLOCK):
            idx = c * chunk_len + i + tl.arange(0, BLOCK)
            m = idx < D
            x = tl.load(x_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            o = tl.load(eps_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            x0, e = _x0_eps(x, o, sqrt_1m_at, sqrt_at, PRED)
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
            mean = sqrt_ap * x0 + dir_coef * e
            if SCORE:
                xp = z
            else:
                xp_stored = cast_rne(mean + sig * z, xprev_ptr.dtype.element_ty)
                tl.store(xprev_ptr + row + idx, xp_stored, mask=m)
                xp = xp_stored.to(tl.float32)
            store_cast(mean_ptr + row + idx, mean, m)
            d = tl.where(m, xp.to(tl.float64) - mean.to(tl.float64), 0.0)  # exact residual
            k = (c * chunk_len + i) // BLOCK
            tl.store(part_ptr + b * nblocks + k, tl.sum(d * d, axis=0), mask=k < nblocks)

    @triton.jit
    def _finalize_kernel(part_ptr, sigma_ptr, lp_ptr, sigma_floor, D, nblocks, BLOCK_K: tl.constexpr):
        """log_prob[b] = -sum_k part[b, k] / (2 s^2) - D log s - (D/2) log 2 pi."""
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK_K)
        total = tl.sum(tl.load(part_ptr + b * nblocks + offs, mask=offs < nblocks, other=0.0), axis=0)
        s = tl.maximum(tl.load(sigma_ptr + b), sigma_floor).to(tl.float64)
        lp = -total / (2.0 * s * s) - log_normalizer(s, D)
        tl.store(lp_ptr + b, lp)

    @triton.jit
    def _backward_kernel(
        x_ptr, eps_ptr, xp_ptr, gm_ptr, gx_ptr, glp_ptr, geps_ptr, abar_t_ptr, abar_prev_ptr, sigma_ptr,
        sigma_floor, clip, D, chunk_len, BLOCK: tl.constexpr,
        HAS_GM: tl.constexpr, HAS_GX: tl.constexpr, HAS_GLP: tl.constexpr, NEED_X0: tl.constexpr, PRED: tl.constexpr,
    ):
        """d o = (g_mean + g_xprev + g_lp (x_prev - mean) / s^2) * (c_eps + c_x0 [|x0_raw| <= clip])."""
        c = tl.program_id(0)
        b = tl.program_id(1)
        row = b.to(tl.int64) * D
        sqrt_1m_at, sqrt_at, sqrt_ap, dir_coef, c_x0, c_eps, sig = _coefficients(abar_t_ptr, abar_prev_ptr, sigma_ptr, b, PRED)
        if HAS_GLP:
            s = tl.maximum(sig, sigma_floor).to(tl.float64)
            lp_coef = (tl.load(glp_ptr + b).to(tl.float64) / (s * s)).to(tl.float32)
        for i in range(0, chunk_len, BLOCK):
            idx = c * chunk_len + i + tl.arange(0, BLOCK)
            m = idx < D
            g = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_GM:
                g += tl.load(gm_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            if HAS_GX:
                g += tl.load(gx_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            if NEED_X0:
                x = tl.load(x_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
                o = tl.load(eps_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
                x0_raw, e = _x0_eps(x, o, sqrt_1m_at, sqrt_at, PRED)
                d_mean = c_eps + tl.where(tl.abs(x0_raw) <= clip, c_x0, 0.0)
                if HAS_GLP:
                    mean = sqrt_ap * tl.minimum(tl.maximum(x0_raw, -clip), clip) + dir_coef * e
                    xp = tl.load(xp_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
                    g += lp_coef * (xp - mean)
            else:
                d_mean = c_eps + c_x0
            store_cast(geps_ptr + row + idx, g * d_mean, m)


class _DDIMStep(torch.autograd.Function):
    """Triton forward/backward. ``z`` is the noise (score=False) or the given x_prev (score=True).
    Outputs: (x_prev, mean, log_prob) when sampling, (mean, log_prob) when scoring."""

    @staticmethod
    def forward(ctx, x_t, eps, abar_t, abar_prev, sigma, z, score, clip_x0, sigma_floor, out, pred):
        B, D = x_t.shape[0], x_t[0].numel()
        x = _dispatch.flat(x_t, B, D, "x_t")
        e = _dispatch.flat(eps, B, D, "eps")
        zz = _dispatch.flat(z, B, D, "x_prev" if score else "noise")
        dev = x.device
        coefs = [_dispatch.per_sample(v, B, dev, n) for v, n in ((abar_t, "abar_t"), (abar_prev, "abar_prev"), (sigma, "sigma"))]
        sp = _dispatch.split(B, D, dev)
        mean = _dispatch.new_empty(x.shape, x_t.dtype, dev)
        if score:
            x_prev = mean  # unused pointer
        elif out is not None:
            x_prev = out
        else:
            x_prev = _dispatch.new_empty(x.shape, x_t.dtype, dev)
        nblocks = triton.cdiv(D, BLOCK)
        part = _dispatch.new_empty((B, nblocks), torch.float64, dev)
        clip = math.inf if clip_x0 is None else float(clip_x0)
        _forward_kernel[(sp.nchunks, B)](x, e, zz, x_prev, mean, part, *coefs, clip, D, sp.chunk_len, nblocks, BLOCK=BLOCK, SCORE=score, PRED=pred, num_warps=NUM_WARPS)
        log_prob = _dispatch.new_empty((B,), torch.float64, dev)
        _finalize_kernel[(B,)](part, coefs[2], log_prob, float(sigma_floor), D, nblocks, BLOCK_K=triton.next_power_of_2(nblocks), num_warps=1)
        ctx.save_for_backward(x, e, zz, *coefs)
        ctx.set_materialize_grads(False)  # unused outputs give None: no wasted reads in backward
        ctx.score, ctx.clip, ctx.clipped, ctx.sigma_floor, ctx.split = score, clip, clip_x0 is not None, float(sigma_floor), sp
        ctx.pred = pred
        return (mean, log_prob) if score else (x_prev, mean, log_prob)

    @staticmethod
    def backward(ctx, *grads):
        if not ctx.needs_input_grad[1]:
            return (None,) * 11
        x, e, zz, abar_t, abar_prev, sigma = ctx.saved_tensors
        if ctx.score:
            gx, (gm, glp) = None, grads
        else:
            gx, gm, glp = grads  # log_prob does not depend on eps when sampling
            glp = None
        B, D = x.shape[0], x[0].numel()
        need_x0 = ctx.clipped or glp is not None
        geps = _dispatch.new_empty(e.shape, e.dtype, e.device)
        sp = ctx.split
        _backward_kernel[(sp.nchunks, B)](
            x, e, zz,
            gm.contiguous() if gm is not None else e, gx.contiguous() if gx is not None else e,
            glp.float().contiguous() if glp is not None else sigma,
            geps, abar_t, abar_prev, sigma, ctx.sigma_floor, ctx.clip, D, sp.chunk_len, BLOCK=BLOCK,
            HAS_GM=gm is not None, HAS_GX=gx is not None, HAS_GLP=glp is not None, NEED_X0=need_x0, PRED=ctx.pred, num_warps=NUM_WARPS,
        )
        return None, geps, None, None, None, None, None, None, None, None, None


def ddim_step(x_t, eps, abar_t, abar_prev, sigma, noise=None, x_prev=None, clip_x0=None, sigma_floor=0.0, out=None,
              prediction_type="epsilon"):
    """Fused DDIM step -> (x_prev, mean, log_prob [B] float64); differentiable w.r.t. eps, the model output
    read as ``prediction_type`` (epsilon, sample, v_prediction; module docstring).

    Give ``noise`` to sample, ``x_prev`` to score a cached action, neither to draw noise with torch.randn.
    ``out`` (sampling without grad): a contiguous [B, ...] buffer of any float dtype that receives x_prev
    (e.g. the rollout cache's next state); the log-prob scores x_prev as stored there.
    """
    pred = prediction_index(prediction_type)
    if noise is not None and x_prev is not None:
        raise ValueError("give either noise or x_prev, not both")
    if out is not None:
        if x_prev is not None:
            raise ValueError("out receives a sampled x_prev; it cannot be given with x_prev")
        if out.shape != x_t.shape or not out.is_contiguous() or not out.is_floating_point():
            raise ValueError(f"out must be a contiguous floating tensor of shape {tuple(x_t.shape)}, got {tuple(out.shape)}")
        if torch.is_grad_enabled() and eps.requires_grad:
            raise ValueError("out is for sampling without grad (the rollout); the gradient needs a fresh x_prev")
    if not _dispatch.use_triton(x_t, eps, noise, x_prev, out):
        return ddim_step_reference(x_t, eps, abar_t, abar_prev, sigma, noise=noise, x_prev=x_prev, clip_x0=clip_x0,
                                   sigma_floor=sigma_floor, out=out, prediction_type=prediction_type)
    _dispatch.no_grad_required(x_t=x_t, noise=noise, x_prev=x_prev, abar_t=abar_t, abar_prev=abar_prev, sigma=sigma)
    if x_prev is not None:
        mean, log_prob = _DDIMStep.apply(x_t, eps, abar_t, abar_prev, sigma, x_prev, True, clip_x0, sigma_floor, None, pred)
        return x_prev.to(x_t.dtype), mean, log_prob
    if noise is None:
        noise = torch.randn(x_t.shape, device=x_t.device, dtype=torch.float32)
    return _DDIMStep.apply(x_t, eps, abar_t, abar_prev, sigma, noise, False, clip_x0, sigma_floor, out, pred)
