"""Shared checks of the kernel tests (not a test module): poisoned kernel outputs, seeded
inputs per test, the relative check "kernel error <= 2 x the PyTorch reference's error" and
absolute bounds against the exact float64 answer.

The absolute bounds come from first-order rounding analysis (standard model: each fp32 operation
rounds its result once, |fl(a op b) - a op b| <= u |a op b|, u = 2^-24; inputs are exact in their
dtype, bf16/fp16 outputs add one rounding of u = 2^-8 / 2^-11 of the value). Per element, every
intermediate of the fused ops is bounded by a magnitude M (given per op below), so a chain of
``ELEM_OPS`` fp32 roundings errs by at most ``ELEM_OPS * u * M``; a sum of n terms accumulated
in fp32 errs by at most ``sum_depth(n) * u * sum |terms|`` plus the terms' own errors. They are
several times the typical error yet orders of magnitude below a wrong constant or a lost block,
which the relative check cannot see when the reference shares the mistake.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from ppo_ddpm.kernels import _dispatch

EPS32 = torch.finfo(torch.float32).eps
U32 = EPS32 / 2  # unit roundoff of fp32
ELEM_OPS = 12  # fp32 roundings on one element's path, coefficients included (ddim_step: 8 operations + 4 roundings of coefficients)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer a kernel writes starts as NaN (floats) or garbage (ints), so an element the
    kernel forgets to write shows up in the comparison."""

    def new_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(0xAB if dtype == torch.uint8 else -7)

    monkeypatch.setattr(_dispatch, "new_empty", new_empty)


@pytest.fixture
def gen(request):
    """Fresh inputs per test case, reproducible from the test id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(shape, gen, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def assert_within_2x(name: str, out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, slack: float = 0.0) -> None:
    """max|out - exact| <= 2 max|ref - exact| + slack (slack: a few fp32 ulps of the result's scale,
    for results the reference happens to get exactly right)."""
    exact = exact.detach().double()
    err_k = (out.detach().double() - exact).abs().max().item()
    err_r = (ref.detach().double() - exact).abs().max().item()
    assert math.isfinite(err_k), f"{name}: kernel output is not finite"
    assert err_k <= 2 * err_r + slack, f"{name}: kernel error {err_k:.3g} > 2 x reference error {err_r:.3g} + slack {slack:.3g}"


def ulps(x: torch.Tensor, n: float = 4.0) -> float:
    """n fp32 ulps of the largest |x|."""
    return n * EPS32 * max(x.detach().double().abs().max().item(), 1e-30)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def rounding_error(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest error of rounding the float64 values ``v`` to ``dtype``: u |v|, or half the subnormal spacing."""
    fi = torch.finfo(dtype)
    return unit_roundoff(dtype) * v.abs() + fi.smallest_normal * fi.eps / 2


def sum_depth(n: int) -> int:
    """Longest chain of fp32 additions a term goes through in the chunked reductions of n elements: its
    lane's loop over BLOCK steps (<= ceil(n / BLOCK)), the sum over the BLOCK lanes (<= 23 levels: numpy's
    pairwise sum in the interpreter; 11 on a GPU) and the sum of the chunk partials (<= log2(chunks) + 1)."""
    blocks = -(-n // _dispatch.BLOCK)
    return blocks + 23 + math.ceil(math.log2(blocks)) + 1


def assert_within_bound(name: str, out: torch.Tensor, exact: torch.Tensor, bound) -> None:
    """|out - exact| <= bound elementwise (bound: a number or a tensor broadcast to exact): an absolute check
    against float64 maths, so a mistake the kernel shares with its PyTorch reference fails here too."""
    exact = exact.detach().double()
    err = (out.detach().double() - exact).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=exact.device).expand_as(exact)
    assert torch.isfinite(err).all(), f"{name}: kernel output is not finite"
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name}: error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"(element {worst.item()}, exact {exact.flatten()[worst].item():.6g})"
    )


def _col(v, like: torch.Tensor) -> torch.Tensor:
    """Scalar or [B] -> float64 [B, 1, ..., 1] broadcasting against ``like``."""
    v = torch.as_tensor(v, dtype=torch.float64, device=like.device).expand(like.shape[0])
    return v.reshape(-1, *[1] * (like.dim() - 1))


def ddim_step_bounds(x_t, eps, abar_t, sigma, z, score, exact, exact_grad=None, grads=(None, None, None), clip_x0=None, sigma_floor=0.0):
    """Absolute error bounds of ddim_step's (x_prev, mean, log_prob, d eps) against the float64 answer
    ``exact`` = (x_prev, mean, log_prob) and ``exact_grad`` (d eps for cotangents ``grads`` = (g x_prev,
    g mean, g log_prob), None where absent). Output dtype: x_t's.

    Per element, X = (|x_t| + |eps|) / sqrt(abar_t) bounds x0 and M = X + |eps| + |sigma z| (|x_prev| when
    scoring) every intermediate, so mean and x_prev err by <= ELEM_OPS u M in fp32, plus the output rounding
    u_d |value|. log_prob: the kernel's d = x_prev - mean errs by dd = ELEM_OPS u M + u |d| when scoring (mean's
    error), and by dd = u (|mean| + ELEM_OPS u M + 3 |d|) when sampling (x_prev = fl(mean + fl(sigma z)) carries
    mean's error, which cancels in d); so sum d^2 errs by sum (2 |d| dd + dd^2 + u d^2) + sum_depth(D) u sum d^2;
    divided by 2 s^2, plus u |log_prob|.
    d eps = g (dir - k [inside]) with |dir - k| <= 1 + sqrt((1 - abar_t) / abar_t) =: K and
    g = g_mean + g_x + g_lp (x_prev - mean) / s^2 (rounded to x_t's dtype by autograd when it is not fp32):
    <= u_d |d eps| + K ((u_d + 6u) G + |g_lp| / s^2 dd), G = |g_mean| + |g_x| + |g_lp d| / s^2;
    where x0 lies within the fp32 error of +-clip_x0 the clamp decision may differ: + K |g| there.
    """
    u_d = unit_roundoff(x_t.dtype)
    x, e = x_t.detach().double(), eps.detach().double()
    a_t, sig = _col(abar_t, x), _col(sigma, x)
    X = (x.abs() + e.abs()) / a_t.sqrt()
    M = X + e.abs() + (z.double().abs() if score else sig * z.double().abs())
    elem = ELEM_OPS * U32 * M
    x_prev, mean, log_prob = (t.detach().double() for t in exact)
    bounds = {"x_prev": 0.0 if score else rounding_error(x_prev, x_t.dtype) + (1 + u_d) * elem,
              "mean": rounding_error(mean, x_t.dtype) + (1 + u_d) * elem}
    d = x_prev - mean
    dd = elem + U32 * d.abs() if score else U32 * (mean.abs() + elem + 3 * d.abs())
    s = sig.clamp_min(sigma_floor)
    sq_err = (2 * d.abs() * dd + dd * dd + U32 * d * d).flatten(1).sum(1) + sum_depth(x[0].numel()) * U32 * (d * d).flatten(1).sum(1)
    bounds["log_prob"] = sq_err / (2 * s.flatten() ** 2) + U32 * log_prob.abs()
    if exact_grad is not None:
        g_x, g_mean, g_lp = (None if g is None else torch.as_tensor(g, dtype=torch.float64, device=x.device).abs() for g in grads)
        G = torch.zeros_like(x)  # sampling: d eps = (g_mean + g_x) d mean / d eps; scoring: g_mean + g_lp d / s^2
        for g in (g_mean,) if score else (g_mean, g_x):
            G = G + (0.0 if g is None else g)
        lp_coef = _col(g_lp, x) / s**2 if (score and g_lp is not None) else torch.zeros_like(s)
        K = 1 + ((1 - a_t) / a_t).sqrt()
        g_mag = G + lp_coef * d.abs()
        bound = rounding_error(exact_grad.detach().double(), x_t.dtype) + K * ((u_d + 6 * U32) * g_mag + lp_coef * dd)
        if clip_x0 is not None:
            x0_raw = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            bound = bound + torch.where((x0_raw.abs() - clip_x0).abs() <= elem, K * g_mag, 0.0)
        bounds["d eps"] = bound
    return bounds


def log_ratio_bounds(x_prev, mu_new, other, sigma, exact, exact_grad=None, g=None, from_logprob=False, sigma_floor=0.0):
    """Absolute error bounds of gaussian_log_ratio(_from_logprob)'s output [B] and d mu_new against the float64
    answers (no per-step clip active near |log r|). The kernel sums t_i = (mn - mo)(2x - mn - mo), with
    |error| <= 4 u |mn - mo| (2|x| + |mn| + |mo|), or t_i = -(x - mn)^2, |error| <= 3 u (x - mn)^2; the sum adds
    sum_depth(D) u sum |t|; divided by 2 s^2, plus u |log r| (the per-sample maths is fp64).
    d mu_new = g keep (x - mn) / s^2: <= u_d |d mu_new| + 4 u |g| |x - mn| / s^2."""
    x, mn = x_prev.detach().double(), mu_new.detach().double()
    s = _col(sigma, x).clamp_min(sigma_floor)
    if from_logprob:
        t = (x - mn) ** 2
        t_err = 3 * U32 * t
    else:
        mo = other.detach().double()
        t = (mn - mo) * (2 * x - mn - mo)
        t_err = 4 * U32 * (mn - mo).abs() * (2 * x.abs() + mn.abs() + mo.abs())
    sum_err = sum_depth(x[0].numel()) * U32 * t.abs().flatten(1).sum(1) + t_err.flatten(1).sum(1)
    bounds = {"log_ratio": sum_err / (2 * s.flatten() ** 2) + U32 * exact.detach().double().abs()}
    if exact_grad is not None:
        u_d = unit_roundoff(mu_new.dtype)
        g = _col(torch.as_tensor(g, dtype=torch.float64, device=x.device).abs(), x)
        bounds["d mu_new"] = rounding_error(exact_grad.detach().double(), mu_new.dtype) + (1 + u_d) * 4 * U32 * g * (x - mn).abs() / s**2
    return bounds


def trajectory_bounds(log_ratio_steps, advantages, loss, log_ratio, weights, stats, per_step_clip=None) -> dict:
    """Absolute error bounds of trajectory_ppo's outputs against the float64 answers (loss, log r [B],
    weights [B], stats: name -> value). The per-step values are exact in fp32 and summed in fp64, so log r
    errs only by its rounding to fp32, dl = u |log r| (+ T 2^-53 sum |l|), and by the clip c rounded to fp32
    on each clipped step (u c per step); r = exp(log r) by dr = r dl + u r; the fp64 per-sample terms carry
    these into the weights (|A| dr / B + u |w|), the loss (sum |A| dr / B + u |loss|), approx_kl_k1 (mean dl)
    and approx_kl_k3 (mean |r - 1| dl), each plus u of its value; counts are exact. Keys: loss, log_ratio,
    ratio, weights and those of ``stats``."""
    l, adv = log_ratio_steps.double(), advantages.double()
    log_r = log_ratio.detach().double()
    r = log_r.exp()
    T, B = l.shape
    dl = U32 * log_r.abs() + T * 2.0**-53 * l.abs().sum(0)
    if per_step_clip is not None:
        dl = dl + U32 * per_step_clip * (l.abs() >= per_step_clip * (1 - U32)).sum(0)
    dr = r * dl + U32 * r
    bounds = {"log_ratio": dl, "ratio": dr, "weights": adv.abs() * dr / B + U32 * weights.detach().double().abs(),
              "loss": (adv.abs() * dr).sum() / B + U32 * abs(float(loss))}
    extra = {"approx_kl_k1": dl.mean(), "approx_kl_k3": ((r - 1).abs() * dl).mean()}
    bounds.update({k: extra.get(k, 0.0) + U32 * abs(float(v)) for k, v in stats.items()})
    return bounds
