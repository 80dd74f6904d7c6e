"""Shared benchmark plumbing: device, sizes, timing with CUDA sync, torch.compile guard,
saved-tensor accounting and the environment recorded with every figure.

On CUDA every group uses the real sizes of issue 5; on CPU it uses small sizes so the whole
suite runs in minutes on 2 cores. On CPU the kernel functional API dispatches to its plain
PyTorch reference (benchmarks/conftest.py clears TRITON_INTERPRET so the Triton interpreter,
meaningless for timing, is never what is timed).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ppo_ddpm.config import Config, load_config
from ppo_ddpm.ddpm.model import build_model

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if ON_CUDA else torch.device("cpu")

# Kernel grid: (image side, batch). CUDA: the default config's 3x32x32 at B=64 (launch-bound) and the
# headline 3x256x256 at B=256, where every group moves >= 256 MB per call (>= 4x the 50-60 MB L2 of an
# H100/H200), so the time is HBM traffic, not launch overhead.
KERNEL_SIZES = [(32, 64), (256, 256)] if ON_CUDA else [(8, 8), (8, 64), (16, 8), (16, 64), (32, 8), (32, 64)]
KERNEL_DTYPES = [torch.float32, torch.bfloat16] if ON_CUDA else [torch.float32]
HEADLINE_BYTES = 256 << 20
CHANNELS = 3
# Calls per timed round: on CUDA one round replays a CUDA graph of INNER calls, then synchronises,
# so host launch overhead and the sync are out of the timing; medians are reported per call.
INNER = 20 if ON_CUDA else 1
WARMUP_CALLS = 3  # after the first call, before capture / timing


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def kernel_path() -> str:
    """'triton' when the fused ops launch Triton on DEVICE tensors, else 'reference'."""
    try:
        from ppo_ddpm.kernels._dispatch import use_triton
    except ImportError:
        return "unavailable"
    return "triton" if use_triton(torch.zeros(1, device=DEVICE)) else "reference"


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    """Device and versions, stored in machine_info and in every benchmark's extra_info."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    env = {
        "device": torch.cuda.get_device_name(0) if ON_CUDA else f"CPU: {cpu_model()}",
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "kernel_path": kernel_path(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        env["loadavg_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return env


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def run_inner(fn, inner: int = INNER):
    """A callable that runs ``fn`` ``inner`` times then synchronises (the timed unit)."""

    def go():
        for _ in range(inner):
            out = fn()
        sync()
        return out

    return go


def annotate(benchmark, **info) -> None:
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(info)


def median_s(benchmark) -> float:
    """Median seconds of one timed round (after the run)."""
    return benchmark.stats.stats.median


def timed_round(fn, setup=None, inner: int = INNER):
    """The timed unit of a kernel benchmark, prepared: ``setup`` (e.g. the forward whose graph a
    backward benchmark replays) runs once, then the first call of ``fn`` (Triton JIT, torch.compile)
    is timed apart, and WARMUP_CALLS more calls follow. On CUDA ``inner`` calls are then captured in
    one CUDA graph (capture timed apart) and a round replays it and synchronises: GPU time, not host
    launch overhead. Elsewhere a round runs ``inner`` calls. All of it runs on one stream, a side stream
    on CUDA (backward ops run on their forward's stream, and the capture must see them).

    Returns (round, info) with info = {setup_s (with setup), first_call_s, capture_s (CUDA), timing: 'cuda_graph' | 'eager'}.
    """
    stream = torch.cuda.Stream() if ON_CUDA else None
    info = {}
    with torch.cuda.stream(stream) if ON_CUDA else contextlib.nullcontext():
        t0 = time.perf_counter()
        if setup is not None:
            setup()
            sync()
            info["setup_s"] = time.perf_counter() - t0
        info["first_call_s"] = first_call_s(fn)
        for _ in range(WARMUP_CALLS):
            fn()
        sync()
    if not ON_CUDA:
        info["timing"] = "eager"
        return run_inner(fn, inner), info
    graph = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(inner):
            fn()
    sync()
    info.update(capture_s=time.perf_counter() - t0, timing="cuda_graph")

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    replay()  # the first replay uploads the graph
    return replay, info


def first_call_s(fn) -> float:
    """Seconds of one call of ``fn``, synchronised: the first call of a benchmark (CUDA-graph capture,
    Triton JIT, allocator growth), made before its warm-up and timed rounds and reported apart."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (torch._dynamo.utils.counters)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compiled(fn):
    """A fresh ``torch.compile(fn, fullgraph=True, dynamic=False)`` for one group (op, shape, dtype,
    direction). Dynamo keeps its compiled code on the function's code object, so one compile object
    shared across groups recompiles for each and, past ``recompile_limit`` (8), silently runs eager:
    the caches are therefore reset first, and ``fullgraph`` makes any graph break an error. Skips the
    test (with the reason) where torch.compile is unavailable, e.g. no C++ compiler for inductor's CPU backend."""
    try:
        import torch._dynamo
        import torch._functorch.config as fconf

        torch._dynamo.reset()
        fconf.donated_buffer = False  # the backward benchmarks replay one graph (retain_graph=True)
        return torch.compile(fn, fullgraph=True, dynamic=False)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        pytest.skip(f"torch.compile unavailable: {type(e).__name__}: {e}"[:300])


class _Held:
    """A tensor saved for backward, counted until autograd releases it."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tracker, tensor, key):
        self.tracker, self.tensor, self.key = tracker, tensor, key

    def __del__(self):
        self.tracker._release(self.key)


class SavedTensorPeak:
    """Peak bytes held by autograd for backward (saved tensors, deduplicated by storage,
    parameters excluded) while the context is active: the activation memory of training,
    measurable on CPU where there is no max_memory_allocated.

        with SavedTensorPeak(model.parameters()) as m: ...;  m.peak
    """

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.refs: dict[int, list] = {}
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self.exclude:
            return t
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [0, st.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Held(self, t, key)

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Held) else h

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


# --------------------------------------------------------------------------- PPO-level setups

CONFIG = Path(__file__).resolve().parents[1] / "configs" / ("default.yaml" if ON_CUDA else "smoke.yaml")
BATCH = 64 if ON_CUDA else 8  # rollouts per iteration: issue 5's B=64 on CUDA


def bench_config(steps: int, batch: int = BATCH, overrides: tuple[str, ...] = ()) -> Config:
    """configs/default.yaml (CUDA: the CIFAR-size UNet) or configs/smoke.yaml (CPU: a tiny UNet),
    with ``steps`` DDIM steps, ``batch`` rollouts and extra ``key=value`` overrides."""
    return load_config(CONFIG, [f"sampling.num_inference_steps={steps}", f"ppo.batch_size={batch}",
                                f"ppo.microbatch={min(batch, 32)}", f"device={DEVICE.type}", *overrides])


def make_policy(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised (deterministic) UNet of cfg.model on DEVICE."""
    torch.manual_seed(seed)
    return build_model(replace(cfg.model, pretrained="")).to(DEVICE)


def mean_pixel_reward(x0: torch.Tensor, class_labels=None) -> torch.Tensor:
    """A cheap frozen reward, R(x_0) = mean pixel value [B]: the benchmarks time the engine, not a reward model."""
    return x0.float().mean(dim=(1, 2, 3))


mean_pixel_reward.name = "mean_pixel"


def model_info(cfg: Config, policy: torch.nn.Module) -> dict:
    return {"config": CONFIG.name, "params": sum(p.numel() for p in policy.parameters()),
            "sample_size": cfg.model.sample_size, "batch": cfg.ppo.batch_size, "steps": cfg.sampling.num_inference_steps}
