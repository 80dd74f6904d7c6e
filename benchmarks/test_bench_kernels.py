"""Kernel groups: the fused op (functional API) vs its plain-PyTorch reference vs
torch.compile(reference), on the same inputs; GB/s = bytes moved (each kernel
module's ``bytes_moved``) / median time per call.

Groups ``kernel:<op>:<S>x<S>:B<B>:<dtype>`` with impl in {fused, reference, compile}, plus one
``copy`` group (device-to-device copy, the measured bandwidth the kernels are compared with).
On CUDA a timed round replays a CUDA graph of INNER calls (``harness.timed_round``); the first call
(JIT / compilation) and the capture are reported apart. Each compile impl is its own torch.compile
object (``harness.compiled``), and the test fails if dynamo compiled nothing or recompiled while timed.
On CPU "fused" is the dispatcher's CPU path, i.e. the reference plus dispatch overhead.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import (
    CHANNELS, DEVICE, HEADLINE_BYTES, INNER, KERNEL_DTYPES, KERNEL_SIZES, ON_CUDA, annotate, compiled, dynamo_graphs,
    median_s, timed_round,
)

glr = pytest.importorskip("ppo_ddpm.kernels.gaussian_log_ratio")
dstep = pytest.importorskip("ppo_ddpm.kernels.ddim_step")

SIGMA_FLOOR = 1e-2
COPY_BYTES = (1 << 30) if ON_CUDA else (128 << 20)
IMPLS = ["fused", "reference", "compile"]
BENCH = pytest.mark.benchmark(max_time=0.5 if ON_CUDA else 0.25, min_rounds=10)
SIZES = pytest.mark.parametrize("side,B", KERNEL_SIZES, ids=[f"{s}x{s}-B{b}" for s, b in KERNEL_SIZES])


def _inputs(side: int, B: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (B, CHANNELS, side, side)
    x = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    mu_old = (x.float() + 0.3 * torch.randn(shape, generator=g, device=DEVICE)).to(dtype)
    mu_new = (mu_old.float() + 0.01 * torch.randn(shape, generator=g, device=DEVICE)).to(dtype)
    sigma = 0.05 + 0.5 * torch.rand(B, generator=g, device=DEVICE)
    return x, mu_new, mu_old, sigma


def _impl(impl: str, fused, reference):
    """The callable of ``impl``; a fresh compile object per benchmark (one group, one direction)."""
    return {"fused": fused, "reference": reference}.get(impl) or compiled(reference)


def _run(benchmark, call, *, op, impl, side, B, dtype, nbytes, setup=None):
    """Warm up, capture, time, and record the figures of one benchmark (harness.timed_round)."""
    graphs = dynamo_graphs()
    try:
        go, info = timed_round(call, setup)
    except Exception as e:  # noqa: BLE001 - only torch.compile may fail here: skip with the reason
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile of the {op} reference failed: {type(e).__name__}: {e}"[:300])
    if impl == "compile":
        info["dynamo_graphs"] = dynamo_graphs() - graphs
        assert info["dynamo_graphs"] >= 1, "torch.compile compiled no graph: the timing would be eager"
    benchmark.group = f"kernel:{op}:{side}x{side}:B{B}:{str(dtype).removeprefix('torch.')}"
    annotate(benchmark, kind="kernel", op=op, impl=impl, side=side, batch=B, dtype=str(dtype), bytes_moved=nbytes, inner=INNER,
             headline=nbytes >= HEADLINE_BYTES, **info)
    benchmark(go)
    if impl == "compile":
        assert dynamo_graphs() - graphs == info["dynamo_graphs"], "dynamo recompiled during the timed rounds"
    per_call = median_s(benchmark) / INNER
    benchmark.extra_info.update(median_per_call_s=per_call, gbps=nbytes / per_call / 1e9)


@BENCH
def test_copy_bandwidth(benchmark):
    """dst.copy_(src): reads and writes COPY_BYTES; the bandwidth ceiling for the kernels."""
    src = torch.empty(COPY_BYTES // 4, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    go, info = timed_round(lambda: dst.copy_(src))
    benchmark.group = "copy"
    annotate(benchmark, kind="copy", impl="copy", bytes_moved=2 * COPY_BYTES, inner=INNER, **info)
    benchmark(go)
    per_call = median_s(benchmark) / INNER
    benchmark.extra_info.update(median_per_call_s=per_call, gbps=2 * COPY_BYTES / per_call / 1e9)


@BENCH
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@SIZES
def test_log_ratio_forward(benchmark, side, B, dtype, impl):
    fn = _impl(impl, glr.gaussian_log_ratio, glr.gaussian_log_ratio_reference)
    x, mn, mo, sig = _inputs(side, B, dtype)

    def call():
        with torch.no_grad():
            return fn(x, mn, mo, sig, sigma_floor=SIGMA_FLOOR)

    _run(benchmark, call, op="log_ratio_fwd", impl=impl, side=side, B=B, dtype=dtype, nbytes=glr.bytes_moved(x, mn, mo))


@BENCH
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@SIZES
def test_log_ratio_backward(benchmark, side, B, dtype, impl):
    """d log r / d mu_new only (the forward is built once, its graph replayed with retain_graph)."""
    fn = _impl(impl, glr.gaussian_log_ratio, glr.gaussian_log_ratio_reference)
    x, mn, mo, sig = _inputs(side, B, dtype)
    mn.requires_grad_(True)
    g = torch.randn(B, device=DEVICE)
    holder = {}

    def build():
        holder["out"] = fn(x, mn, mo, sig, sigma_floor=SIGMA_FLOOR)

    _run(benchmark, lambda: torch.autograd.grad(holder["out"], mn, g, retain_graph=True), op="log_ratio_bwd", impl=impl,
         side=side, B=B, dtype=dtype, nbytes=glr.bytes_moved(x, mn, backward=True), setup=build)


@BENCH
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@SIZES
def test_ddim_step(benchmark, side, B, dtype, impl):
    """Sampling step with given noise and clip_x0: reads x_t, eps, noise; writes x_prev, mean (+ log_prob [B])."""
    fn = _impl(impl, dstep.ddim_step, dstep.ddim_step_reference)
    x_t, eps, noise, _ = _inputs(side, B, dtype, seed=1)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    abar_t = 0.1 + 0.8 * torch.rand(B, generator=gen, device=DEVICE)
    abar_prev = (abar_t + 0.05).clamp_max(0.999)
    sigma = 0.5 * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()

    def call():
        with torch.no_grad():
            return fn(x_t, eps, abar_t, abar_prev, sigma, noise=noise, clip_x0=1.0, sigma_floor=SIGMA_FLOOR)

    _run(benchmark, call, op="ddim_step", impl=impl, side=side, B=B, dtype=dtype, nbytes=dstep.bytes_moved(x_t, eps, noise, score=False))
