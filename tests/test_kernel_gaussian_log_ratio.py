"""Fused per-step Gaussian log-ratio vs float64 hand formulas (Triton interpreter on CPU)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from kernel_checks import assert_within_2x, assert_within_bound, gen, log_ratio_bounds, poison, randn, ulps  # noqa: F401

from ppo_ddpm.kernels import (
    gaussian_log_ratio,
    gaussian_log_ratio_from_logprob,
    gaussian_log_ratio_from_logprob_reference,
    gaussian_log_ratio_reference,
)

pytestmark = pytest.mark.usefixtures("poison")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 3, 7, 5), (3, 3, 50, 50), (1, 17)]  # (3, 3, 50, 50): 2 chunks x 2 blocks per sample


def exact_log_ratio(x, mn, mo, s, clip=None):
    """float64: (||x - mo||^2 - ||x - mn||^2) / (2 s^2), clamped."""
    x, mn, mo, s = (t.double() for t in (x, mn, mo, s))
    lr = ((x - mo) ** 2 - (x - mn) ** 2).flatten(1).sum(1) / (2 * s * s)
    return lr if clip is None else lr.clamp(-clip, clip)


def exact_from_logprob(x, mn, old, s, clip=None):
    """float64: -||x - mn||^2 / (2 s^2) - D log s - D/2 log 2 pi - old, clamped."""
    x, mn, old, s = (t.double() for t in (x, mn, old, s))
    D = x[0].numel()
    lr = -((x - mn) ** 2).flatten(1).sum(1) / (2 * s * s) - D * s.log() - 0.5 * D * math.log(2 * math.pi) - old
    return lr if clip is None else lr.clamp(-clip, clip)


def make(shape, dtype, gen):
    """x_prev = mu_old + sigma z and a nearby mu_new, so that log r is O(1)."""
    B, D = shape[0], math.prod(shape[1:])
    sigma = (0.05 + 0.3 * torch.rand(B, generator=gen, dtype=torch.float64)).float()
    mo = randn(shape, gen)
    x = mo + sigma.view(-1, *[1] * (len(shape) - 1)) * randn(shape, gen)
    mn = mo + randn(shape, gen, 0.3 / math.sqrt(D)) * sigma.view(-1, *[1] * (len(shape) - 1))
    return [t.to(dtype).to(DEV) for t in (x, mn, mo)] + [sigma.to(DEV)]


def run(fn, x, mn, other, sigma, g, **kw):
    """Output and d(sum g * out)/d mu_new."""
    mn = mn.detach().clone().requires_grad_(True)
    out = fn(x, mn, other, sigma, **kw)
    (out * g).sum().backward()
    return out.detach(), mn.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["mu_old", "from_logprob"])
def test_forward_and_backward_match_float64(variant, shape, dtype, gen):
    x, mn, mo, sigma = make(shape, dtype, gen)
    s64 = sigma.double()
    g = randn(shape[:1], gen).to(DEV)
    if variant == "mu_old":
        fn, ref_fn, other = gaussian_log_ratio, gaussian_log_ratio_reference, mo
        exact_fn = exact_log_ratio
    else:
        other = (exact_from_logprob(x, mo, torch.zeros(shape[0], dtype=torch.float64, device=DEV), s64)).float()
        fn, ref_fn, exact_fn = gaussian_log_ratio_from_logprob, gaussian_log_ratio_from_logprob_reference, exact_from_logprob
    out, grad = run(fn, x, mn, other, sigma, g)
    ref, ref_grad = run(ref_fn, x, mn, other, sigma, g)
    mn64 = mn.double().requires_grad_(True)
    exact = exact_fn(x, mn64, other, s64)
    (exact * g.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert grad.dtype == dtype and grad.shape == mn.shape
    # the from-logprob constants D log s cancel against old_log_prob: allow a few ulps of them
    scale = exact.abs() + (other.double().abs() if variant == "from_logprob" else 0)
    assert_within_2x("log_ratio", out, ref, exact, ulps(scale))
    assert_within_2x("d mu_new", grad, ref_grad, mn64.grad, ulps(mn64.grad, 1))
    bounds = log_ratio_bounds(x, mn, other, sigma, exact, mn64.grad, g, from_logprob=variant == "from_logprob")
    assert_within_bound("log_ratio", out, exact, bounds["log_ratio"])
    assert_within_bound("d mu_new", grad, mn64.grad, bounds["d mu_new"])


@pytest.mark.parametrize("variant", ["mu_old", "from_logprob"])
def test_per_step_clip_gradient_flows_on_the_boundary_only(variant, gen):
    """|log r| < c: unchanged; |log r| == c: value c, gradient kept (as torch.clamp); |log r| > c: zero grad."""
    shape = (3, 3, 7, 5)
    x, mn, mo, sigma = make(shape, torch.float32, gen)
    g = torch.ones(3, device=DEV)
    if variant == "mu_old":
        fn, other = gaussian_log_ratio, mo
    else:
        fn, other = gaussian_log_ratio_from_logprob, torch.zeros(3, device=DEV)
        other = exact_from_logprob(x, mo, other, sigma.double()).float()
    free, free_grad = run(fn, x, mn, other, sigma, g)
    order = free.abs().argsort()
    lo, mid, hi = order.tolist()
    c = free[mid].abs().item()  # sample `mid` sits exactly on the boundary
    out, grad = run(fn, x, mn, other, sigma, g, per_step_clip=c)
    assert out[lo] == free[lo] and out[mid] == free[mid] and out[hi] == math.copysign(c, free[hi].item())
    assert torch.equal(grad[lo], free_grad[lo]) and torch.equal(grad[mid], free_grad[mid])
    assert (grad[hi] == 0).all()
    below = torch.nextafter(torch.tensor(c), torch.tensor(0.0)).item()  # one fp32 ulp in: `mid` is clipped too
    out, grad = run(fn, x, mn, other, sigma, g, per_step_clip=below)
    assert out[mid].abs().item() == below and (grad[mid] == 0).all()
    ref_fn = gaussian_log_ratio_reference if variant == "mu_old" else gaussian_log_ratio_from_logprob_reference
    ref, ref_grad = run(ref_fn, x, mn, other, sigma, g, per_step_clip=below)
    assert ref[hi] == out[hi] and (ref_grad[hi] == 0).all()  # the reference clips the same way


@pytest.mark.parametrize("sigma", [0.0, [0.0, 1e-30, 0.2]])
def test_sigma_to_zero_uses_the_floor(sigma, gen):
    shape = (3, 3, 7, 5)
    x, mn, mo, _ = make(shape, torch.float32, gen)
    floor = 0.5
    sig = torch.tensor(sigma, device=DEV) if isinstance(sigma, list) else sigma
    s64 = torch.as_tensor(sigma, dtype=torch.float64, device=DEV).expand(3).clamp_min(floor)
    old = torch.full((3,), -300.0, device=DEV)
    for fn, ref_fn, other, exact_fn, offset in (
        (gaussian_log_ratio, gaussian_log_ratio_reference, mo, exact_log_ratio, 0.0),
        (gaussian_log_ratio_from_logprob, gaussian_log_ratio_from_logprob_reference, old, exact_from_logprob, 300.0),
    ):
        out = fn(x, mn, other, sig, sigma_floor=floor)
        ref = ref_fn(x, mn, other, sig, sigma_floor=floor)
        exact = exact_fn(x, mn, other, s64)
        assert torch.isfinite(out).all()
        assert_within_2x("log_ratio", out, ref, exact, ulps(exact.abs() + offset))


def test_identical_means_give_zero_and_scalar_sigma(gen):
    x, mn, _, _ = make((3, 3, 7, 5), torch.bfloat16, gen)
    out = gaussian_log_ratio(x, mn, mn, 0.1)
    assert torch.equal(out, torch.zeros(3, device=DEV))


def test_gradcheck_references():
    """float64 gradcheck; the from-logprob reference computes in fp32 (ddim.gaussian_log_prob), so it
    is checked with central differences of a large step, exact for its quadratic dependence on mu_new."""
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    mn = (x + 0.3 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    sigma = torch.tensor([0.7, 0.9], dtype=torch.float64)
    free = gaussian_log_ratio_reference(x, mn, mo, sigma).detach()
    c = 0.5 * (free[0].abs() + free[1].abs()).item()  # one sample clipped, the other not, away from c
    assert torch.autograd.gradcheck(lambda m: gaussian_log_ratio_reference(x, m, mo, sigma, per_step_clip=c), (mn,))
    old = torch.tensor([-20.0, -15.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda m: gaussian_log_ratio_from_logprob_reference(x, m, old, sigma.float(), per_step_clip=100.0).double(),
        (mn,), eps=0.05, atol=2e-3, rtol=1e-3,
    )


def test_bad_inputs_name_the_argument(gen):
    x, mn, mo, sigma = make((3, 3, 7, 5), torch.float32, gen)
    with pytest.raises(ValueError, match="mu_old"):
        gaussian_log_ratio(x, mn, mo[:, :2], sigma)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_log_ratio(x, mn, mo, sigma[:2])
    with pytest.raises(ValueError, match="old_log_prob"):
        gaussian_log_ratio_from_logprob(x, mn, torch.zeros(2, device=DEV), sigma)
    with pytest.raises(ValueError, match="mu_old requires grad"):
        gaussian_log_ratio(x, mn, mo.requires_grad_(True), sigma)


def test_cpu_without_triton_runs_the_reference():
    """The package imports and runs without Triton (and without TRITON_INTERPRET it uses the reference)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from ppo_ddpm.kernels import gaussian_log_ratio, _dispatch\n"
        "assert not _dispatch.HAS_TRITON\n"
        "x = torch.randn(2, 5); print(gaussian_log_ratio(x, x + 0.1, x, 0.5).tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [round(v, 4) for v in eval(res.stdout)] == [round(-5 * 0.01 / (2 * 0.25), 4)] * 2


def test_bytes_moved():
    from ppo_ddpm.kernels import gaussian_log_ratio_bytes

    x, m = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16), torch.empty(4, 3, 8, 8)
    assert gaussian_log_ratio_bytes(x, m, m) == 768 * (2 + 4 + 4)
    assert gaussian_log_ratio_bytes(x, m) == 768 * 6 and gaussian_log_ratio_bytes(x, m, backward=True) == 768 * 10
