"""When to run Triton, how to split a per-sample reduction, and argument normalisation.

All fused ops stream a [B, D] view of their inputs (D = product of the non-batch dims).
Each sample's D elements are cut into ``nchunks`` contiguous chunks of ``chunk_len``
elements (a multiple of BLOCK); program (c, b) loops over its chunk in BLOCK steps,
accumulates in fp32 and writes one partial sum to ``partial[b, c]``. A tiny second
kernel (one program per sample) adds the partials in a fixed order, so results are
deterministic (no atomics). On a GPU, ``nchunks`` is chosen so that about 4 programs
per SM are in flight even for small B; in the interpreter it targets 8 programs, unless
``emulate_sm_count`` makes ``split`` see the SMs of a given GPU.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    INTERPRET = bool(triton.knobs.runtime.interpret)  # frozen at import, as triton.jit is
except ImportError:  # the package must import on machines without Triton
    triton = tl = None
    INTERPRET = False

HAS_TRITON = triton is not None

BLOCK = 2048  # elements per loop step: 8 per thread at 8 warps (one 16 B load for bf16)
NUM_WARPS = 8


if HAS_TRITON:
    # triton 3.7.1's interpreter casts fp32 -> bf16 by truncation (interpreter.py, cast_impl); GPUs
    # round to nearest even. Under the interpreter, bf16 casts therefore round by bit arithmetic.
    _BF16_BY_BITS = tl.constexpr(INTERPRET)

    @triton.jit
    def cast_rne(value, dtype: tl.constexpr):
        """``value`` converted to ``dtype`` with round-to-nearest-even (as a GPU converts)."""
        out = value.to(dtype)
        if _BF16_BY_BITS:  # interpreter only: compiled kernels keep the plain cast above
            if dtype == tl.bfloat16:
                bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return out

    @triton.jit
    def log_normalizer(s, D):
        """D (log s + (1/2) log 2 pi) in float64 for s fp64 and D an integer: the Gaussian log-normaliser.
        (Built here in fp64: a Python float argument would reach the kernel rounded to fp32.)"""
        d = tl.full([], 0.0, tl.float64) + D
        return d * (tl.log(s) + tl.full([], 0.91893853320467274178, tl.float64))

    @triton.jit
    def store_cast(ptr, value, mask):
        """tl.store(ptr, value) converted to ptr's element type with round-to-nearest-even."""
        tl.store(ptr, cast_rne(value, ptr.dtype.element_ty), mask=mask)


def use_triton(*tensors) -> bool:
    """True when the Triton kernels can run on these tensors: all on CUDA, or all on the
    CPU under TRITON_INTERPRET=1 (set before the kernel modules were imported)."""
    if not HAS_TRITON:
        return False
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if ts and all(t.is_cuda for t in ts):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in ts)


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocation of every buffer a kernel writes (tests replace it to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 8
_emulated_sms: int | None = None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def emulate_sm_count(num_sms: int):
    """Within the block, ``split`` targets PROGRAMS_PER_SM * num_sms programs on every device
    (interpreter included), as on a GPU with ``num_sms`` SMs: tests of the multi-block path and the
    ahead-of-time compile (``kernels.aot``) see the launches of, e.g., a 132-SM H100/H200."""
    global _emulated_sms
    if not (isinstance(num_sms, int) and num_sms >= 1):
        raise ValueError(f"num_sms must be an int >= 1, got {num_sms!r}")
    previous, _emulated_sms = _emulated_sms, num_sms
    try:
        yield
    finally:
        _emulated_sms = previous


def _target_programs(device: torch.device) -> int:
    if _emulated_sms is not None:
        return PROGRAMS_PER_SM * _emulated_sms
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


@dataclass(frozen=True)
class Split:
    """Launch shape of a chunked per-sample stream: grid = (nchunks, B)."""

    nchunks: int
    chunk_len: int

    @property
    def block_c(self) -> int:
        """Power of two >= nchunks (the finalize kernel's vector width)."""
        return triton.next_power_of_2(self.nchunks)


def split(B: int, D: int, device: torch.device) -> Split:
    """Chunks per sample so that B * nchunks ~ 4 programs per SM (8 in the interpreter)."""
    target = _target_programs(device)
    blocks = triton.cdiv(D, BLOCK)
    nchunks = max(1, min(blocks, triton.cdiv(target, B)))
    chunk_len = triton.cdiv(blocks, nchunks) * BLOCK
    return Split(triton.cdiv(D, chunk_len), chunk_len)


def per_sample(v, B: int, device, name: str) -> torch.Tensor:
    """Python number, 0-d or [B] tensor -> contiguous float32 [B] on ``device``."""
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            return v.to(device=device, dtype=torch.float32).expand(B).contiguous()
        if v.shape != (B,):
            raise ValueError(f"{name} must be a scalar or have shape [{B}], got {tuple(v.shape)}")
        return v.to(device=device, dtype=torch.float32).contiguous()
    return torch.full((B,), float(v), dtype=torch.float32, device=device)


def flat(x: torch.Tensor, B: int, D: int, name: str) -> torch.Tensor:
    """[B, ...] -> contiguous view/copy of B*D elements; checks the shape."""
    if x.dim() < 1 or x.shape[0] != B or x.numel() != B * D:
        raise ValueError(f"{name} must have {B} samples of {D} elements, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x.contiguous()


def no_grad_required(**tensors) -> None:
    """The fused ops differentiate only the documented inputs; refuse silent zero gradients."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but this fused op treats it as a constant; detach it")
