"""Benchmark setup. Run: ``pytest benchmarks --benchmark-only [--benchmark-json out.json]``.

``BENCH_THREADS=N`` sets torch's intra-op threads (default: torch's own choice); recorded in
machine_info as torch_threads. On a CPU shared with other jobs, 1 thread avoids OpenMP barrier
stalls that otherwise dominate the timings.

On a machine without CUDA, TRITON_INTERPRET is removed *before* Triton is imported: the
interpreter is a correctness tool, and timing it would be meaningless, so on CPU the fused
ops' functional API runs its plain-PyTorch reference path (recorded as kernel_path).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET"):
        print("benchmarks: Triton was imported with TRITON_INTERPRET set; kernel timings are the interpreter's", file=sys.stderr)
    os.environ.pop("TRITON_INTERPRET", None)

if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

from benchmarks.harness import environment  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(environment())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    try:
        output_json["loadavg_end"] = os.getloadavg()[0]
    except OSError:
        pass
