"""Compact summary of one ``scripts/gpu_check.sh`` run, printed last: device and versions, each stage's
status, the AOT check and the headline benchmark figures (medians, GB/s, ratios) read from the files
the run left in its output folder (stages.tsv, aot.json, bench_*.json).

    python scripts/gpu_check_summary.py OUT_DIR [--elapsed S] [--budget S]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import _by_kind, load  # noqa: E402


def environment() -> list[str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        device = f"{p.name} ({p.multi_processor_count} SMs, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    else:
        device = "no CUDA device (CPU)"
    nvcc = "absent"
    if shutil.which("nvcc"):
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        nvcc = out[-1] if out else "?"
    return [f"device: {device}",
            f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) | "
            f"triton {triton_version} | nvcc: {nvcc}"]


def table(header: list[str], rows: list[list]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def aot_detail(path: Path) -> str:
    """Per arch: compiles and failures (kernel, problem) of kernels.aot's JSON."""
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    parts = []
    for arch in sorted({k["arch"] for k in data["kernels"]}, reverse=True):
        ks = [k for k in data["kernels"] if k["arch"] == arch]
        bad = ["{kernel} {signature}: {problem}".format(**k) for k in ks if k["problem"]]
        parts.append(f"sm_{arch}: {len(ks)} compiles, " + (f"{len(bad)} FAILED ({'; '.join(bad[:3])})" if bad else "0 spills, all OK"))
    return f"{data['launches']} launches; " + "; ".join(parts)


def stages(out: Path) -> list[str]:
    rows = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, secs, detail = (line.split("\t") + [""] * 4)[:4]
        if name == "aot" and status in ("PASS", "FAIL"):
            detail = aot_detail(out / "aot.json") or detail
        rows.append([name, status, secs, detail])
    return table(["stage", "status", "s", "detail"], rows)


def _x(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def kernel_rows(kinds: dict) -> list[str]:
    copy = kinds.get("copy", [])
    copy_gbps = copy[0]["extra_info"]["gbps"] if copy else None
    groups: dict = {}
    for b in kinds.get("kernel", []):
        groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b["extra_info"]
    rows = []
    for g, impls in sorted(groups.items()):
        f, r, c = impls.get("fused"), impls.get("reference"), impls.get("compile")
        if f is None:
            continue
        rows.append([f"{f['op']} {f['side']}x{f['side']} B{f['batch']} {f['dtype'].removeprefix('torch.')}", f"{f['bytes_moved'] / 1e6:,.0f}",
                     f"{f['median_per_call_s'] * 1e6:,.1f}", f"{f['gbps']:,.0f}", f"{100 * f['gbps'] / copy_gbps:.0f}%" if copy_gbps else "-",
                     _x(r and r["median_per_call_s"], f["median_per_call_s"]), _x(c and c["median_per_call_s"], f["median_per_call_s"])])
    lines = [f"copy bandwidth: {copy_gbps:,.0f} GB/s" if copy_gbps else "copy bandwidth: not measured"]
    if rows:
        lines += table(["kernel (fused)", "MB/call", "median us", "GB/s", "% copy", "vs eager ref", "vs compile"], rows)
    return lines


def ppo_rows(kinds: dict) -> list[str]:
    lines = []
    for kind, base in (("rollout", "ddpo"), ("ppo_iter", "ddpo"), ("ppo_precision", "fp32")):
        groups: dict = {}
        for b in kinds.get(kind, []):
            groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b["stats"]["median"]
        for g, m in sorted(groups.items()):
            others = ", ".join(f"{impl} {s:.3f} s ({_x(m.get(base), s)} of {base})" for impl, s in sorted(m.items()) if impl != base)
            graph = f"; graph vs eager {_x(m.get('eager'), m.get('graph'))}" if "graph" in m else ""
            lines.append(f"{g}: {base} {m.get(base, float('nan')):.3f} s; {others}{graph}")
    mem: dict = {}
    for b in kinds.get("train_memory", []):
        e = b["extra_info"]
        mem.setdefault(e["impl"], {})[e["steps"]] = e.get("cuda_max_allocated_bytes") or e.get("saved_tensor_peak_bytes")
    for impl, per_t in sorted(mem.items()):
        ts = sorted(per_t)
        lines.append(f"train memory {impl}: " + ", ".join(f"T={t} {per_t[t] / 2**20:,.0f} MiB" for t in ts)
                     + f" (T={ts[-1]} / T={ts[0]} = {_x(per_t[ts[-1]], per_t[ts[0]])})")
    for b in kinds.get("loss_check", []):
        e = b["extra_info"]
        lines.append(f"loss check: |trainer - DDPO| = {abs(e['trainer_loss'] - e['ddpo_loss']):.2e} "
                     f"(tolerance {e.get('tolerance', float('nan')):g} (1 + |loss|))")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the output folder of scripts/gpu_check.sh")
    ap.add_argument("--elapsed", type=int, help="seconds the run took")
    ap.add_argument("--budget", type=int, help="the run's budget in seconds")
    args = ap.parse_args(argv)
    if not (args.out / "stages.tsv").exists():
        raise SystemExit(f"{args.out}: no stages.tsv (not a gpu_check.sh output folder)")
    lines = ["", "=" * 30 + " gpu_check summary " + "=" * 30] + environment()
    if args.elapsed is not None:
        lines.append(f"elapsed {args.elapsed} s of a {args.budget} s budget")
    lines += [""] + stages(args.out)
    benches = sorted(args.out.glob("bench_*.json"))
    if benches:
        kinds = _by_kind(load(benches)["benchmarks"])
        lines += [""] + kernel_rows(kinds) + [""] + ppo_rows(kinds)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
