"""Ahead-of-time compile of every Triton launch of the fused ops, for GPUs that are not here.

    python -m ppo_ddpm.kernels.aot [--arch 90 80] [--sms 132] [--max-batch 300] [--json PATH]

Discovery. The public ops run on ``meta`` tensors (shapes and dtypes, no data) in every case of
``sweep``: ddim_step sampling (noise given or drawn) and scoring, with and without clip_x0, forward
and every backward (gradient through x_prev, mean, log_prob and their combinations);
gaussian_log_ratio and gaussian_log_ratio_from_logprob forward/backward on what ddim_step returned;
fp32/bf16/fp16 states and model outputs; the image sizes of both configs and 3x256x256; B = 1 ..
max_batch. Then, one loop each: those ddim_step / log-ratio cases for the other prediction types
(sample, v_prediction; fp32 and bf16 end to end, the dtypes a policy feeds them); sampling into
``out=`` buffers of fp32 and bf16 (the rollout writing into the cache) from fp32 and bf16 states;
trajectory_ppo on the log-ratios they return for both grad masks (strict, ppo), T up to 1000.
``_dispatch.split`` sees an ``sms``-SM GPU, and ``JITFunction.run`` records each launch (kernel,
arguments with tensors replaced by their dtypes, constexprs, num_warps, grid) instead of running
it. Kernels that gain arguments, constexprs or launches are followed without edits here.

Compile. For each target ``GPUTarget("cuda", arch, 32)`` a stand-in driver replaces the CUDA one,
and every distinct launch goes through ``JITFunction.warmup``: Triton's own binder specialises it
as for a real launch (pointers 16-byte aligned, as PyTorch's CUDA allocator gives them; ints equal
to 1 or divisible by 16), and ``triton.compile`` lowers it to a cubin with the ptxas of the triton
wheel. Identical specialisations compile once.

Check. ptxas's ``-v`` log of each compile gives registers and spill bytes, Triton's metadata the
shared memory. Every launch must compile, with 0 spill bytes and shared memory within the
target's per-block limit; the command exits 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

from . import _dispatch
from ppo_ddpm.ddpm.ddim import PREDICTION_TYPES

from .ddim_step import ddim_step
from .gaussian_log_ratio import gaussian_log_ratio, gaussian_log_ratio_from_logprob
from .ppo_trajectory import GRAD_MASKS, trajectory_ppo

SHAPES = ((3, 16, 16), (3, 32, 32), (3, 256, 256))  # configs/smoke.yaml, configs/default.yaml, a 256^2 model
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_PAIRS = tuple((d, d) for d in DTYPES) + ((torch.float32, torch.bfloat16), (torch.float32, torch.float16))
"""(state dtype, model-output dtype): a policy in one dtype, or an fp32 state with a lower-precision output."""
PREDICTION_DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16))
"""What a policy feeds ddim_step (the trainer casts an autocast UNet's output to fp32): the other pairs differ
from these only in load widths, compiled for epsilon prediction."""
OUT_DTYPES = (torch.float32, torch.bfloat16)  # ``out=`` buffers: the rollout cache's state dtypes
STEPS = (1, 10, 50, 100, 1000)  # T of trajectory_ppo
H100_SMS = 132  # H100 / H200 SXM
ARCHS = (90, 80)
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
"""Largest shared memory one block may use (opt-in), bytes, by compute capability."""


@dataclass(frozen=True)
class Launch:
    """One kernel launch with its tensors replaced by their dtypes: what specialises a compile."""

    kernel: object  # triton JITFunction
    args: tuple
    options: tuple  # sorted (name, value) keyword arguments: constexprs, num_warps

    @property
    def name(self) -> str:
        """module.kernel, e.g. ddim_step._forward_kernel."""
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"


@dataclass
class Compiled:
    """One compiled specialisation for one target; ``launches``: distinct launches (grids apart) using it."""

    kernel: str
    arch: int
    signature: str
    num_warps: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    launches: int = 0
    grids: set = field(default_factory=set)
    error: str = ""

    @property
    def problem(self) -> str:
        """Why this compile fails the check ('' when it passes)."""
        if self.error:
            return self.error
        if self.spill_bytes != 0:
            return f"{self.spill_bytes} spill bytes (stores + loads)"
        if not 0 <= self.shared_bytes <= SMEM_PER_BLOCK[self.arch]:
            return f"{self.shared_bytes} bytes of shared memory > {SMEM_PER_BLOCK[self.arch]} per block"
        return ""

    @property
    def ok(self) -> bool:
        return not self.problem


@contextlib.contextmanager
def record_launches(num_sms: int = H100_SMS):
    """Within the block the fused ops run their Triton path on any tensors (meta included), split as on
    a ``num_sms``-SM GPU, and each launch is recorded, not run. Yields {Launch: set of grids}."""
    from triton.runtime.jit import JITFunction

    launches: dict[Launch, set] = {}
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:  # JITFunction.warmup: compile, as in ``compile_launches``
            return run(self, *args, grid=grid, warmup=True, **kwargs)
        key = Launch(self, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), tuple(sorted(kwargs.items())))
        launches.setdefault(key, set()).add(tuple(grid))
        return None

    with mock.patch.object(JITFunction, "run", record), mock.patch.object(_dispatch, "use_triton", lambda *tensors: True), \
            _dispatch.emulate_sm_count(num_sms):
        yield launches


def _grad(outputs, inputs):
    """d(sum of the outputs) / d inputs on meta tensors, keeping the graph for the next combination."""
    return torch.autograd.grad(outputs, inputs, [torch.empty_like(o) for o in outputs], retain_graph=True)


def _ddim_cases(x_t, eps, coefs, clip_x0, per_step_clip, sigma_floor=0.01, prediction_type="epsilon") -> int:
    """Every ddim_step / log-ratio call of one state: forward and each backward. Returns the op calls."""
    calls = 0
    step = dict(clip_x0=clip_x0, sigma_floor=sigma_floor, prediction_type=prediction_type)
    for noise in (torch.empty_like(x_t), None):  # given in the state dtype, or drawn (float32)
        x_prev, mean, _ = ddim_step(x_t, eps, *coefs, noise=noise, **step)
        for outs in ((x_prev,), (mean,), (x_prev, mean)):
            _grad(outs, eps)
        calls += 4
    action = x_prev.detach()
    _, mu, log_prob = ddim_step(x_t, eps, *coefs, x_prev=action, **step)
    for outs in ((mu,), (log_prob,), (mu, log_prob)):
        _grad(outs, eps)
    kw = dict(sigma_floor=sigma_floor, per_step_clip=per_step_clip)
    log_r = gaussian_log_ratio_from_logprob(action, mu, log_prob.detach(), coefs[2], **kw)
    _grad((log_r,), eps)  # log-ratio backward, then ddim_step's through mean: the PPO update
    _grad((gaussian_log_ratio(action, mu, mean.detach(), coefs[2], **kw),), eps)
    return calls + 6


def _states(shapes, max_batch: int, dtype_pairs):
    """(x_t, eps with grad, [abar_t, abar_prev, sigma]) on meta tensors for every shape, B and dtype pair."""
    for shape in shapes:
        for B in range(1, max_batch + 1):
            coefs = [torch.empty(B, device="meta") for _ in range(3)]
            for state_dtype, model_dtype in dtype_pairs:
                yield (torch.empty(B, *shape, dtype=state_dtype, device="meta"),
                       torch.empty(B, *shape, dtype=model_dtype, device="meta", requires_grad=True), coefs)


CLIPS = ((None, None), (1.0, 1.0))  # (clip_x0, per_step_clip): off, on


def sweep(max_batch: int, shapes=SHAPES, dtype_pairs=DTYPE_PAIRS, steps=STEPS) -> tuple[int, torch.dtype]:
    """Call every public op in every case of the module docstring on meta tensors (run it inside
    ``record_launches``). Returns (op calls, dtype of the per-step log-ratios trajectory_ppo got)."""
    calls = 0
    for x_t, eps, coefs in _states(shapes, max_batch, dtype_pairs):  # epsilon prediction, every dtype pair
        for clip_x0, per_step_clip in CLIPS:
            calls += _ddim_cases(x_t, eps, coefs, clip_x0, per_step_clip)
    for x_t, eps, coefs in _states(shapes, max_batch, PREDICTION_DTYPE_PAIRS):  # the other prediction types
        for prediction_type in PREDICTION_TYPES[1:]:
            for clip_x0, per_step_clip in CLIPS:
                calls += _ddim_cases(x_t, eps, coefs, clip_x0, per_step_clip, prediction_type=prediction_type)
    with torch.no_grad():  # sampling into out= buffers (the rollout cache's next state), any state dtype
        for x_t, eps, coefs in _states(shapes, max_batch, PREDICTION_DTYPE_PAIRS):
            for out_dtype in OUT_DTYPES:
                out = torch.empty(x_t.shape, dtype=out_dtype, device="meta")
                for noise in (torch.empty_like(x_t), None):
                    ddim_step(x_t, eps, *coefs, noise=noise, out=out, clip_x0=1.0, sigma_floor=0.01)
                    calls += 1
    mu = torch.empty(1, *shapes[0], device="meta")
    log_r_dtype = gaussian_log_ratio_from_logprob(mu, mu, ddim_step(mu, mu, 0.5, 0.6, 0.1, x_prev=mu)[2], 0.1).dtype
    for T in steps:  # trajectory_ppo, both grad masks
        for B in range(1, max_batch + 1):
            log_r = torch.empty(T, B, dtype=log_r_dtype, device="meta")
            adv = torch.empty(B, device="meta")
            for grad_mask in GRAD_MASKS:
                for per_step_clip, global_clip in ((None, None), (1.0, 5.0)):
                    trajectory_ppo(log_r, adv, clip_range=0.2, per_step_clip=per_step_clip, global_clip=global_clip,
                                   grad_mask=grad_mask)
                    calls += 1
    return calls, log_r_dtype


class _StandInDriver:
    """What JITFunction.run/warmup ask of Triton's driver, for a GPU that is not here (no launch)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return ("aot", self.target.arch)  # JITFunction keeps one kernel cache per device: one per target

    def get_current_stream(self, device=None):
        return 0


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _signature(src) -> str:
    """Compact specialisation of a compiled ASTSource: pointer dtypes, constexprs (ints specialised
    to 1 included) and the ints Triton found divisible by 16."""
    names = list(src.signature)
    consts = {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
    div16 = [names[k[0]] for k, v in src.attrs.items() if len(k) == 1 and "tt.divisibility" in str(v)]
    ptrs = [t[1:] for t in src.signature.values() if isinstance(t, str) and t.startswith("*")]
    parts = ["*" + ",".join(ptrs)]
    parts += [f"{n}={getattr(v, 'value', v)}" for n, v in consts.items()]
    ints = [n for n in div16 if src.signature[n] in ("i32", "i64")]
    if ints:
        parts.append("%16:" + ",".join(ints))
    return " ".join(parts)


def compile_launches(launches: dict, arch: int) -> list[Compiled]:
    """Compile every launch for GPUTarget("cuda", arch, 32); one entry per distinct compile."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if arch not in SMEM_PER_BLOCK:
        raise ValueError(f"arch {arch}: known compute capabilities are {sorted(SMEM_PER_BLOCK)}")
    stand_in = _StandInDriver(GPUTarget("cuda", arch, 32))
    device = stand_in.get_current_device()
    out: dict[str, Compiled] = {}
    failed: list[Compiled] = []
    with tempfile.TemporaryDirectory() as cache_dir, knobs.cache.scope(), knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.cache.dir = cache_dir  # a fresh cache: every specialisation runs ptxas and logs
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        previous = driver._active  # None until a real driver was needed; reset_active() would create one
        driver.set_active(stand_in)
        try:
            for launch, grids in launches.items():
                log = io.StringIO()
                try:
                    with contextlib.redirect_stdout(log):
                        kernel = launch.kernel.warmup(*launch.args, grid=next(iter(grids)), **dict(launch.options))
                except Exception as e:  # noqa: BLE001 - every failure is reported, then the command fails
                    text = f"{type(e).__name__}: {e}".strip()
                    failed.append(Compiled(launch.name, arch, repr(launch.args), dict(launch.options).get("num_warps", 4), error=text[-2000:]))
                    continue
                entry = out.get(kernel.hash)
                if entry is None:
                    entry = out[kernel.hash] = Compiled(launch.name, arch, _signature(kernel.src), kernel.metadata.num_warps,
                                                        shared_bytes=int(kernel.metadata.shared))
                    text = log.getvalue()
                    regs, spills = _PTXAS_REGS.findall(text), _PTXAS_SPILLS.findall(text)
                    if len(regs) != 1 or len(spills) != 1:
                        entry.error = f"could not read registers/spills from the ptxas log: {text[-500:]!r}"
                    else:
                        entry.registers, entry.spill_bytes = int(regs[0]), int(spills[0][0]) + int(spills[0][1])
                entry.launches += 1
                entry.grids |= grids
        finally:
            driver.set_active(previous)
            for launch in launches:
                launch.kernel.device_caches.pop(device, None)
    return sorted(out.values(), key=lambda c: (c.kernel, c.signature, c.num_warps)) + failed


def table(results: list[Compiled]) -> str:
    """One line per compiled specialisation: registers, spills, shared memory, launches using it."""
    head = f"{'kernel':<38} {'arch':>5} {'warps':>5} {'regs':>5} {'spill':>5} {'smem':>7} {'uses':>5} {'grids':>5}  specialisation"
    lines = [head, "-" * len(head)]
    for c in results:
        status = f"  FAILED: {c.problem}" if c.problem else ""
        lines.append(f"{c.kernel:<38} {'sm_' + str(c.arch):>5} {c.num_warps:>5} {c.registers:>5} {c.spill_bytes:>5} "
                     f"{c.shared_bytes:>7} {c.launches:>5} {len(c.grids):>5}  {c.signature}{status}")
    return "\n".join(lines)


def check(archs=ARCHS, num_sms: int = H100_SMS, max_batch: int = 300, shapes=SHAPES) -> dict:
    """Discover the launches, compile them for every arch; returns a JSON-able summary."""
    t0 = time.perf_counter()
    with record_launches(num_sms) as launches:
        calls, log_r_dtype = sweep(max_batch, shapes=shapes)
    t_discover = time.perf_counter() - t0
    results, seconds = {}, {}
    for arch in archs:
        t1 = time.perf_counter()
        results[arch] = compile_launches(launches, arch)
        seconds[arch] = time.perf_counter() - t1
    return {
        "num_sms": num_sms, "max_batch": max_batch, "shapes": [list(s) for s in shapes], "op_calls": calls,
        "log_ratio_dtype": str(log_r_dtype), "launches": len(launches),
        "launch_grids": sum(len(g) for g in launches.values()), "discover_s": round(t_discover, 2),
        "compile_s": {str(a): round(s, 2) for a, s in seconds.items()},
        "kernels": [dict(asdict(c), grids=len(c.grids), problem=c.problem) for a in archs for c in results[a]],
        "ok": all(c.ok for a in archs for c in results[a]), "_results": results,
    }


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser(prog="python -m ppo_ddpm.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default: 90 80)")
    ap.add_argument("--sms", type=int, default=H100_SMS, help="SMs of the GPU whose launches are compiled (default: 132)")
    ap.add_argument("--max-batch", type=int, default=300, help="B = 1 .. this (default: 300)")
    ap.add_argument("--json", help="write the summary (one entry per compiled specialisation) to this file")
    args = ap.parse_args(argv)
    if _dispatch.INTERPRET:
        print("TRITON_INTERPRET is set: unset it, the AOT check compiles real kernels", file=sys.stderr)
        return 2
    bad = [a for a in args.arch if a not in SMEM_PER_BLOCK]
    if bad:
        ap.error(f"--arch {bad}: known compute capabilities are {sorted(SMEM_PER_BLOCK)}")
    if args.sms < 1 or args.max_batch < 1:
        ap.error("--sms and --max-batch must be >= 1")
    summary = check(tuple(args.arch), args.sms, args.max_batch)
    results = summary.pop("_results")
    print(f"triton {triton.__version__}, torch {torch.__version__}: {summary['op_calls']} op calls on meta tensors, "
          f"{summary['launches']} distinct launches ({summary['launch_grids']} with grids) on a {args.sms}-SM GPU, "
          f"B = 1..{args.max_batch}, shapes {[tuple(s) for s in SHAPES]}; discovery {summary['discover_s']} s")
    for arch in args.arch:
        rows = results[arch]
        nbad = sum(not c.ok for c in rows)
        print(f"\nsm_{arch}: {len(rows)} compiles in {summary['compile_s'][str(arch)]} s, "
              f"{'all OK (0 spill bytes, shared memory within the limit)' if not nbad else f'{nbad} FAILED'}")
        print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary, triton=triton.__version__, torch=torch.__version__), f, indent=1, default=str)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
