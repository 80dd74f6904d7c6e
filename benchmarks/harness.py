"""Shared benchmark plumbing: device, sizes, timing with CUDA sync, torch.compile guard,
saved-tensor accounting and the environment recorded with every figure.

On CUDA every group uses the real sizes of issue 5; on CPU it uses small sizes so the whole
suite runs in minutes on 2 cores. On CPU the kernel functional API dispatches to its plain
PyTorch reference (benchmarks/conftest.py clears TRITON_INTERPRET so the Triton interpreter,
meaningless for timing, is never what is timed).
"""
from __future__ import annotations

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

# Kernel grid: (image side, batch). CUDA covers 8x8..256x256 and B=8..256.
KERNEL_SIDES = [8, 32, 64, 128, 256] if ON_CUDA else [8, 16, 32]
KERNEL_BATCHES = [8, 64, 256] if ON_CUDA else [8, 64]
KERNEL_DTYPES = [torch.float32, torch.bfloat16] if ON_CUDA else [torch.float32]
CHANNELS = 3
# Calls per timed round: on CUDA one round = INNER back-to-back launches + one synchronize,
# so the sync and Python overheads are amortised; medians are reported per call.
INNER = 20 if ON_CUDA else 1


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


_compiled: dict = {}


def compiled(fn, name: str):
    """torch.compile(fn) with default settings, built once per name; skips the test (with the
    reason) when compilation is unavailable here, e.g. no C++ compiler for inductor's CPU backend."""
    if name in _compiled:
        c = _compiled[name]
        if isinstance(c, Exception):
            pytest.skip(f"torch.compile of {name} failed earlier: {type(c).__name__}: {c}"[:300])
        return c
    try:
        # the backward benchmarks replay one graph (retain_graph=True); donated buffers forbid that
        import torch._functorch.config as fconf

        fconf.donated_buffer = False
        _compiled[name] = torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        _compiled[name] = e
        pytest.skip(f"torch.compile unavailable: {type(e).__name__}: {e}"[:300])
    return _compiled[name]


def first_call(go, compile_name: str | None = None) -> float | None:
    """Run ``go`` once before timing. For a torch.compile impl (``compile_name`` given) this is the
    compilation: returns its seconds, or skips the test with the reason if it raises."""
    if compile_name is None:
        go()
        return None
    t0 = time.perf_counter()
    try:
        go()
        sync()
    except Exception as e:  # noqa: BLE001
        _compiled[compile_name] = e
        pytest.skip(f"torch.compile of {compile_name} failed: {type(e).__name__}: {e}"[:300])
    return time.perf_counter() - t0


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
