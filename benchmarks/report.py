"""Turn a pytest-benchmark JSON into the RESULTS.md tables.

    pytest benchmarks --benchmark-only --benchmark-json /tmp/bench.json
    python -m benchmarks.report /tmp/bench.json                               # print the tables
    python -m benchmarks.report /tmp/bench.json --results benchmarks/RESULTS.md  # replace the generated block
    python -m benchmarks.report kernels.json ppo.json memory.json ...         # several runs of one machine, merged

Ratios are computed within one run: kernels against the ``reference`` impl of the same group
and against the ``copy`` group's bandwidth; rollout / PPO iteration against the ``ddpo`` baseline
(and graph against eager); storage as baseline bytes / cache bytes; training memory as T=100 / T=10.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

BEGIN, END = "<!-- BEGIN GENERATED (python -m benchmarks.report) -->", "<!-- END GENERATED -->"


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def _s(s: float) -> str:
    return f"{s:.3f}" if s >= 0.1 else f"{s * 1e3:.2f} ms"


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:,.2f}"


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _by_kind(benchmarks: list[dict]) -> dict[str, list[dict]]:
    kinds = defaultdict(list)
    for b in benchmarks:
        kinds[b["extra_info"].get("kind", "other")].append(b)
    return kinds


def environment(data: dict) -> list[str]:
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    lines = [
        f"- device: **{m.get('device', '?')}** ({m.get('cpu_count', '?')} logical CPUs, torch threads {m.get('torch_threads', '?')})",
        f"- torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, CUDA {m.get('cuda', '?')}, python {m.get('python_version', '?')}",
        f"- kernel path timed as \"fused\": **{m.get('kernel_path', '?')}**"
        + (" (no CUDA: the functional API's CPU path, i.e. the plain-PyTorch reference)" if m.get("kernel_path") == "reference" else ""),
        f"- run: {data.get('datetime', '?')}, commit {str(c.get('id', '?'))[:10]}{' (dirty tree)' if c.get('dirty') else ''}, "
        f"pytest-benchmark {data.get('version', '?')}",
    ]
    if "loadavg_start" in m:
        lines.append(f"- 1-min load average at start {m['loadavg_start']:.2f}"
                     + (f", at end {data['loadavg_end']:.2f}" if "loadavg_end" in data else ""))
    return lines + [""]


def kernels(kinds: dict) -> list[str]:
    copy = kinds.get("copy", [])
    copy_gbps = copy[0]["extra_info"]["gbps"] if copy else None
    out = []
    if copy:
        b = copy[0]
        out += [f"Measured copy bandwidth (`dst.copy_(src)`, {b['extra_info']['bytes_moved'] / 2**20:,.0f} MiB moved): "
                f"**{copy_gbps:.1f} GB/s** (median {_s(b['extra_info']['median_per_call_s'])}, IQR {_s(b['stats']['iqr'])}).", ""]
    groups = defaultdict(dict)
    for b in kinds.get("kernel", []):
        groups[b["group"]][b["extra_info"]["impl"]] = b
    rows = []
    for g in sorted(groups, key=lambda g: tuple(groups[g][next(iter(groups[g]))]["extra_info"][k] for k in ("op", "dtype", "side", "batch"))):
        impls = groups[g]
        ref = impls.get("reference")
        for name in ("fused", "reference", "compile"):
            b = impls.get(name)
            if b is None:
                continue
            e, st = b["extra_info"], b["stats"]
            inner = e.get("inner", 1)
            per_call = e["median_per_call_s"]
            rows.append([e["op"], f"{e['side']}×{e['side']}", e["batch"], e["dtype"].removeprefix("torch."), name,
                         f"{e['bytes_moved'] / 1e6:,.0f}", _us(per_call), _us(st["iqr"] / inner), _us(st["stddev"] / inner), st["rounds"],
                         f"{e['gbps']:.2f}", f"{100 * e['gbps'] / copy_gbps:.0f}%" if copy_gbps else "—",
                         _ratio(ref["extra_info"]["median_per_call_s"], per_call) if ref else "—"])
    if rows:
        if any(b["extra_info"].get("timing") == "cuda_graph" for b in kinds["kernel"]):
            out += [f"Timing: a round replays a CUDA graph of {kinds['kernel'][0]['extra_info']['inner']} calls (host launch "
                    "overhead excluded); headline sizes move >= 256 MB per call.", ""]
        else:
            out += ["Timing: eager calls (no CUDA graph on this device).", ""]
        out += _table(["op", "size", "B", "dtype", "impl", "MB/call", "median µs/call", "IQR µs", "stddev µs", "rounds", "GB/s",
                       "% of copy BW", "speed-up vs reference"], rows)
    first = defaultdict(list)
    for b in kinds.get("kernel", []):
        e = b["extra_info"]
        if e.get("first_call_s") is not None:
            first[(e["impl"], e["op"])].append(e["first_call_s"] + e.get("setup_s", 0.0))
    if first:
        out += ["First call (Triton JIT / torch.compile included; excluded from the timings), max over sizes: "
                + ", ".join(f"{impl} {op} {max(v):.2f} s" for (impl, op), v in sorted(first.items()) if impl != "reference"), ""]
    return out


def throughput(kinds: dict, kind: str, base_impl: str = "ddpo", base_label: str = "DDPO-style") -> list[str]:
    groups = defaultdict(dict)
    for b in kinds.get(kind, []):
        groups[b["group"]][b["extra_info"]["impl"]] = b
    rows = []
    for g in sorted(groups, key=lambda g: (len(g), g)):
        impls = groups[g]
        base = impls.get(base_impl)
        eager = impls.get("eager")
        for name, b in sorted(impls.items(), key=lambda kv: kv[0] == base_impl):
            e, st = b["extra_info"], b["stats"]
            rows.append([g, name, f"{e['params'] / 1e6:.2f}M", _s(e["first_call_s"]) if "first_call_s" in e else "—",
                         _s(st["median"]), _s(st["iqr"]), _s(st["stddev"]), st["rounds"],
                         f"{e['samples_per_s']:.1f}", _ratio(base["stats"]["median"], st["median"]) if base else "—",
                         _ratio(eager["stats"]["median"], st["median"]) if eager and name == "graph" else ""])
    if not rows:
        return []
    return _table(["group", "impl", "UNet params", "first call s", "median s", "IQR", "stddev", "rounds", "samples/s",
                   f"speed-up vs {base_label}", "graph vs eager"], rows)


def storage(kinds: dict) -> list[str]:
    by_t = defaultdict(dict)
    for b in kinds.get("storage", []):
        by_t[b["extra_info"]["steps"]][b["extra_info"]["impl"]] = b["extra_info"]
    rows = []
    for T in sorted(by_t):
        impls = by_t[T]
        base = impls.get("ddpo", {}).get("storage_bytes")
        for name in ("ddpo", "cache_fp32", "cache_bf16"):
            e = impls.get(name)
            if e is None:
                continue
            rows.append([T, f"{e['batch']}×{'×'.join(map(str, e['sample_shape']))}", name, _mib(e["storage_bytes"]),
                         _mib(e.get("cuda_peak_bytes")),
                         "1 (baseline)" if name == "ddpo" else (f"1/{base / e['storage_bytes']:.2f}" if base else "—")])
    if not rows:
        return []
    return _table(["T", "B×sample", "storage", "nbytes MiB", "CUDA peak MiB", "fraction of baseline"], rows)


def train_memory(kinds: dict) -> list[str]:
    by_impl = defaultdict(dict)
    for b in kinds.get("train_memory", []):
        by_impl[b["extra_info"]["impl"]][b["extra_info"]["steps"]] = b
    rows = []
    for impl, per_t in sorted(by_impl.items()):
        ts = sorted(per_t)
        for key, label in (("cuda_max_allocated_bytes", "CUDA max_memory_allocated"), ("saved_tensor_peak_bytes", "autograd saved-tensor peak")):
            vals = [per_t[t]["extra_info"].get(key) for t in ts]
            if any(v is None for v in vals):
                continue
            e = per_t[ts[0]]["extra_info"]
            rows.append([impl, label, f"{e['params'] / 1e6:.2f}M, B={e['batch']}"] + [_mib(v) for v in vals]
                        + [_ratio(vals[-1], vals[0]), " / ".join(_s(per_t[t]["stats"]["median"]) for t in ts)])
    if not rows:
        return []
    ts = sorted({t for per_t in by_impl.values() for t in per_t})
    return _table(["impl", "measure", "model"] + [f"T={t} MiB" for t in ts] + [f"T={ts[-1]} / T={ts[0]}", "update time s"], rows)


def render(data: dict) -> str:
    kinds = _by_kind(data["benchmarks"])
    parts = ["### Environment", ""] + environment(data)
    for title, body in (("Kernels", kernels(kinds)), ("DDIM rollout", throughput(kinds, "rollout")),
                        ("Full PPO iteration", throughput(kinds, "ppo_iter")),
                        ("PPO iteration by precision", throughput(kinds, "ppo_precision", "fp32", "fp32")),
                        ("Rollout storage", storage(kinds)), ("Training peak memory", train_memory(kinds))):
        if body:
            parts += [f"### {title}", ""] + body
    return "\n".join(parts).rstrip() + "\n"


def load(paths: list[Path]) -> dict:
    """Read and merge pytest-benchmark JSONs (machine info, date and commit of the first)."""
    merged = None
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: cannot read a pytest-benchmark JSON: {e}")
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise SystemExit(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)")
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] = merged["benchmarks"] + data["benchmarks"]
            if "loadavg_end" in data:
                merged["loadavg_end"] = data["loadavg_end"]
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json); merged in order")
    ap.add_argument("--results", type=Path, help=f"Markdown file whose block between {BEGIN!r} and {END!r} is replaced")
    args = ap.parse_args(argv)
    text = render(load(args.json))
    if args.results is None:
        sys.stdout.write(text)
        return 0
    doc = args.results.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{args.results}: no generated block ({BEGIN} ... {END}) to replace")
    args.results.write_text(pattern.sub(lambda _: f"{BEGIN}\n\n{text}\n{END}", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
