"""Shared checks of the kernel tests (not a test module): poisoned kernel outputs, seeded
inputs per test and the error bound "kernel error <= 2 x the PyTorch reference's error"."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from ppo_ddpm.kernels import _dispatch

EPS32 = torch.finfo(torch.float32).eps


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
