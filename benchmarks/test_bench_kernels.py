"""Kernel groups: the fused op (functional API) vs its plain-PyTorch reference vs
torch.compile(reference), on the same inputs; GB/s = bytes moved (each kernel
module's ``bytes_moved``) / median time per call.

Groups ``kernel:<op>:<S>x<S>:B<B>:<dtype>`` with impl in {fused, reference, compile}, plus one
``copy`` group (device-to-device copy, the measured bandwidth the kernels are compared with).
On CPU "fused" is the dispatcher's CPU path, i.e. the reference plus dispatch overhead.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import (
    CHANNELS, DEVICE, INNER, KERNEL_BATCHES, KERNEL_DTYPES, KERNEL_SIDES, ON_CUDA, annotate, compiled, median_s,
    first_call, run_inner,
)

glr = pytest.importorskip("ppo_ddpm.kernels.gaussian_log_ratio")
dstep = pytest.importorskip("ppo_ddpm.kernels.ddim_step")

SIGMA_FLOOR = 1e-2
COPY_BYTES = (1 << 30) if ON_CUDA else (128 << 20)
IMPLS = ["fused", "reference", "compile"]
BENCH = pytest.mark.benchmark(max_time=0.5 if ON_CUDA else 0.25, min_rounds=10)


def _inputs(side: int, B: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (B, CHANNELS, side, side)
    x = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    mu_old = (x.float() + 0.3 * torch.randn(shape, generator=g, device=DEVICE)).to(dtype)
    mu_new = (mu_old.float() + 0.01 * torch.randn(shape, generator=g, device=DEVICE)).to(dtype)
    sigma = 0.05 + 0.5 * torch.rand(B, generator=g, device=DEVICE)
    return x, mu_new, mu_old, sigma


def _log_ratio_fn(impl: str):
    if impl == "fused":
        return glr.gaussian_log_ratio
    if impl == "reference":
        return glr.gaussian_log_ratio_reference
    return compiled(glr.gaussian_log_ratio_reference, "gaussian_log_ratio_reference")


def _ddim_fn(impl: str):
    if impl == "fused":
        return dstep.ddim_step
    if impl == "reference":
        return dstep.ddim_step_reference
    return compiled(dstep.ddim_step_reference, "ddim_step_reference")


def _compile_name(impl: str, name: str) -> str | None:
    return name if impl == "compile" else None


def _finish(benchmark, go, *, op, impl, side, B, dtype, nbytes, compile_s=None):
    benchmark.group = f"kernel:{op}:{side}x{side}:B{B}:{str(dtype).removeprefix('torch.')}"
    annotate(benchmark, kind="kernel", op=op, impl=impl, side=side, batch=B, dtype=str(dtype), bytes_moved=nbytes, inner=INNER)
    if compile_s is not None:
        benchmark.extra_info["first_call_s"] = compile_s
    benchmark(go)
    per_call = median_s(benchmark) / INNER
    benchmark.extra_info.update(median_per_call_s=per_call, gbps=nbytes / per_call / 1e9)


@BENCH
def test_copy_bandwidth(benchmark):
    """dst.copy_(src): reads and writes COPY_BYTES; the bandwidth ceiling for the kernels."""
    src = torch.empty(COPY_BYTES // 4, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    go = run_inner(lambda: dst.copy_(src))
    go()
    benchmark.group = "copy"
    annotate(benchmark, kind="copy", impl="copy", bytes_moved=2 * COPY_BYTES, inner=INNER)
    benchmark(go)
    per_call = median_s(benchmark) / INNER
    benchmark.extra_info.update(median_per_call_s=per_call, gbps=2 * COPY_BYTES / per_call / 1e9)


@BENCH
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("B", KERNEL_BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("side", KERNEL_SIDES, ids=lambda s: f"{s}x{s}")
def test_log_ratio_forward(benchmark, side, B, dtype, impl):
    fn = _log_ratio_fn(impl)
    x, mn, mo, sig = _inputs(side, B, dtype)

    def call():
        with torch.no_grad():
            return fn(x, mn, mo, sig, sigma_floor=SIGMA_FLOOR)

    go = run_inner(call)
    first = first_call(go, _compile_name(impl, "gaussian_log_ratio_reference"))
    _finish(benchmark, go, op="log_ratio_fwd", impl=impl, side=side, B=B, dtype=dtype, nbytes=glr.bytes_moved(x, mn, mo), compile_s=first)


@BENCH
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("B", KERNEL_BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("side", KERNEL_SIDES, ids=lambda s: f"{s}x{s}")
def test_log_ratio_backward(benchmark, side, B, dtype, impl):
    """d log r / d mu_new only (the forward is built once, its graph replayed with retain_graph)."""
    fn = _log_ratio_fn(impl)
    x, mn, mo, sig = _inputs(side, B, dtype)
    mn.requires_grad_(True)
    g = torch.randn(B, device=DEVICE)
    holder = {}

    def build():
        holder["out"] = fn(x, mn, mo, sig, sigma_floor=SIGMA_FLOOR)

    name = _compile_name(impl, "gaussian_log_ratio_reference")
    compile_fwd = first_call(build, name)
    go = run_inner(lambda: torch.autograd.grad(holder["out"], mn, g, retain_graph=True))
    compile_bwd = first_call(go, name)
    first = None if name is None else compile_fwd + compile_bwd
    nbytes = glr.bytes_moved(x, mn, backward=True)
    _finish(benchmark, go, op="log_ratio_bwd", impl=impl, side=side, B=B, dtype=dtype, nbytes=nbytes, compile_s=first)


@BENCH
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("B", KERNEL_BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("side", KERNEL_SIDES, ids=lambda s: f"{s}x{s}")
def test_ddim_step(benchmark, side, B, dtype, impl):
    """Sampling step with given noise and clip_x0: reads x_t, eps, noise; writes x_prev, mean (+ log_prob [B])."""
    fn = _ddim_fn(impl)
    x_t, eps, noise, _ = _inputs(side, B, dtype, seed=1)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    abar_t = 0.1 + 0.8 * torch.rand(B, generator=gen, device=DEVICE)
    abar_prev = (abar_t + 0.05).clamp_max(0.999)
    sigma = 0.5 * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()

    def call():
        with torch.no_grad():
            return fn(x_t, eps, abar_t, abar_prev, sigma, noise=noise, clip_x0=1.0, sigma_floor=SIGMA_FLOOR)

    go = run_inner(call)
    first = first_call(go, _compile_name(impl, "ddim_step_reference"))
    nbytes = dstep.bytes_moved(x_t, eps, noise, score=False)
    _finish(benchmark, go, op="ddim_step", impl=impl, side=side, B=B, dtype=dtype, nbytes=nbytes, compile_s=first)
