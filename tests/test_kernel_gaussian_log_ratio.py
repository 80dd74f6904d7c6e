"""Fused per-step Gaussian log-ratio vs float64 hand formulas (Triton interpreter on CPU): both reductions
(R = 1 'sum', R = D 'mean'), float64 old log-probs, exactness at 3x32x32 and s = 0.01."""
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


def divisor(x, reduction):
    return x[0].numel() if reduction == "mean" else 1


def exact_log_ratio(x, mn, mo, s, clip=None, reduction="sum"):
    """float64: (||x - mo||^2 - ||x - mn||^2) / (2 s^2 R), clamped."""
    R = divisor(x, reduction)
    x, mn, mo, s = (t.double() for t in (x, mn, mo, s))
    lr = ((x - mo) ** 2 - (x - mn) ** 2).flatten(1).sum(1) / (2 * s * s * R)
    return lr if clip is None else lr.clamp(-clip, clip)


def exact_log_prob(x, mn, s):
    """float64: log N(x; mn, s^2 I) = -||x - mn||^2 / (2 s^2) - D log s - D/2 log 2 pi."""
    x, mn, s = (t.double() for t in (x, mn, s))
    D = x[0].numel()
    return -((x - mn) ** 2).flatten(1).sum(1) / (2 * s * s) - D * s.log() - 0.5 * D * math.log(2 * math.pi)


def exact_from_logprob(x, mn, old, s, clip=None, reduction="sum"):
    """float64: (log N(x; mn, s^2 I) - old) / R, clamped."""
    lr = (exact_log_prob(x, mn, s) - old.double()) / divisor(x, reduction)
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


def f64_ulps(x: torch.Tensor, n: float = 64.0) -> float:
    return n * torch.finfo(torch.float64).eps * max(x.detach().double().abs().max().item(), 1e-300)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["mu_old", "from_logprob"])
def test_forward_and_backward_match_float64(variant, shape, dtype, reduction, gen):
    x, mn, mo, sigma = make(shape, dtype, gen)
    s64 = sigma.double()
    g = randn(shape[:1], gen).to(DEV)
    if variant == "mu_old":
        fn, ref_fn, other = gaussian_log_ratio, gaussian_log_ratio_reference, mo
        exact_fn = exact_log_ratio
    else:
        other = exact_log_prob(x, mo, s64)  # float64, as the rollout cache stores it
        fn, ref_fn, exact_fn = gaussian_log_ratio_from_logprob, gaussian_log_ratio_from_logprob_reference, exact_from_logprob
    out, grad = run(fn, x, mn, other, sigma, g, reduction=reduction)
    ref, ref_grad = run(ref_fn, x, mn, other, sigma, g, reduction=reduction)
    mn64 = mn.double().requires_grad_(True)
    exact = exact_fn(x, mn64, other, s64, reduction=reduction)
    (exact * g.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (shape[0],) and ref.dtype == torch.float32
    assert grad.dtype == dtype and grad.shape == mn.shape
    # float64 sums: one float32 rounding of log r (the from-logprob constants cancel to fp64 ulps of them)
    scale = other.double().abs() / divisor(x, reduction) if variant == "from_logprob" else exact.abs()
    assert_within_2x("log_ratio", out, ref, exact, ulps(exact, 1) + f64_ulps(scale))
    assert_within_2x("d mu_new", grad, ref_grad, mn64.grad, ulps(mn64.grad, 1))
    bounds = log_ratio_bounds(x, mn, other, sigma, exact, mn64.grad, g, from_logprob=variant == "from_logprob")
    assert_within_bound("log_ratio", out, exact, bounds["log_ratio"])
    assert_within_bound("d mu_new", grad, mn64.grad, bounds["d mu_new"])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("variant", ["mu_old", "from_logprob"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_exact_at_3x32x32_and_sigma_floor_001(impl, variant, reduction, gen):
    """float32 inputs, 3x32x32, sigma below the floor s = float32(0.01): |log r - exact| <= 1e-5 / R with the
    exact value (||x - mu_old||^2 - ||x - mu_new||^2) / (2 s^2 R) in float64 from the same fp32 tensors
    (1e-5 in summed log-prob units for both reductions). The old float32 approach, logp_new - logp_old of
    two float32 totals (~1e4 each), misses it."""
    shape, floor = (4, 3, 32, 32), 0.01
    mo = randn(shape, gen).to(DEV)
    x = mo + floor * randn(shape, gen).to(DEV)
    mn = mo + floor * randn(shape, gen, 1.0 / 32).to(DEV)  # log r = O(1) under 'sum'
    sigma = torch.full((4,), 1e-3, device=DEV)  # the floor binds
    s = torch.tensor(floor, dtype=torch.float32).double().item()
    R = divisor(x, reduction)
    x64, mn64, mo64 = x.double(), mn.double(), mo.double()
    exact = (((x64 - mo64) ** 2).flatten(1).sum(1) - ((x64 - mn64) ** 2).flatten(1).sum(1)) / (2 * s * s * R)
    assert exact.abs().max() > 0.1 / R and exact.abs().max() < 10 / R
    if variant == "mu_old":
        fn = gaussian_log_ratio if impl == "kernel" else gaussian_log_ratio_reference
        out = fn(x, mn, mo, sigma, sigma_floor=floor, reduction=reduction)
    else:
        old = exact_log_prob(x, mo, torch.full((4,), s, device=DEV))  # ~ -1e4, float64
        assert old.abs().min() > 5e3
        fn = gaussian_log_ratio_from_logprob if impl == "kernel" else gaussian_log_ratio_from_logprob_reference
        out = fn(x, mn, old, sigma, sigma_floor=floor, reduction=reduction)
    err = (out.double() - exact).abs().max().item()
    assert err <= 1e-5 / R, err

    # teeth: float32 log-probs of new and old, differenced in float32
    s32 = torch.tensor(floor, dtype=torch.float32)
    D = x[0].numel()

    def log_prob32(mu):
        return -(x - mu).pow(2).flatten(1).sum(1) / (2 * s32 * s32) - D * torch.log(s32) - 0.5 * D * math.log(2 * math.pi)

    old_way = (log_prob32(mn) - log_prob32(mo)) / R
    assert (old_way.double() - exact).abs().max().item() > 1e-5 / R


@pytest.mark.parametrize("variant", ["mu_old", "from_logprob"])
def test_per_step_clip_gradient_flows_on_the_boundary_only(variant, gen):
    """|log r| < c: unchanged; |log r| == c: value c, gradient kept (as torch.clamp); |log r| > c: zero grad."""
    shape = (3, 3, 7, 5)
    x, mn, mo, sigma = make(shape, torch.float32, gen)
    g = torch.ones(3, device=DEV)
    if variant == "mu_old":
        fn, other = gaussian_log_ratio, mo
    else:
        fn, other = gaussian_log_ratio_from_logprob, exact_log_prob(x, mo, sigma.double())
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


@pytest.mark.parametrize("variant", ["mu_old", "from_logprob"])
def test_mean_reduction_divides_before_the_clip_and_scales_the_gradient(variant, gen):
    """'mean': log r / D is what the per-step clip sees (a clip between |log r| / D and |log r| acts under 'sum'
    only), and the gradient is the 'sum' gradient / D."""
    shape = (3, 3, 7, 5)
    D = 105
    x, mn, mo, sigma = make(shape, torch.float32, gen)
    fn, other = (gaussian_log_ratio, mo) if variant == "mu_old" else (gaussian_log_ratio_from_logprob, exact_log_prob(x, mo, sigma.double()))
    g = torch.ones(3, device=DEV)
    total, total_grad = run(fn, x, mn, other, sigma, g)
    mean, mean_grad = run(fn, x, mn, other, sigma, g, reduction="mean")
    torch.testing.assert_close(mean.double(), total.double() / D, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_grad, total_grad / D, rtol=1e-6, atol=0)
    c = 0.5 * total.abs().min().item()
    assert (total.abs() / D < c).all()  # so the clip acts under 'sum' only
    clipped, clipped_grad = run(fn, x, mn, other, sigma, g, per_step_clip=c)
    assert (clipped.abs() == c).all() and (clipped_grad == 0).all()
    kept, kept_grad = run(fn, x, mn, other, sigma, g, per_step_clip=c, reduction="mean")
    assert torch.equal(kept, mean) and torch.equal(kept_grad, mean_grad)


@pytest.mark.parametrize("sigma", [0.0, [0.0, 1e-30, 0.2]])
def test_sigma_to_zero_uses_the_floor(sigma, gen):
    shape = (3, 3, 7, 5)
    x, mn, mo, _ = make(shape, torch.float32, gen)
    floor = 0.5
    sig = torch.tensor(sigma, device=DEV) if isinstance(sigma, list) else sigma
    s64 = torch.as_tensor(sigma, dtype=torch.float64, device=DEV).expand(3).clamp_min(floor)
    old = torch.full((3,), -300.0, dtype=torch.float64, device=DEV)
    for fn, ref_fn, other, exact_fn, offset in (
        (gaussian_log_ratio, gaussian_log_ratio_reference, mo, exact_log_ratio, 0.0),
        (gaussian_log_ratio_from_logprob, gaussian_log_ratio_from_logprob_reference, old, exact_from_logprob, 300.0),
    ):
        out = fn(x, mn, other, sig, sigma_floor=floor)
        ref = ref_fn(x, mn, other, sig, sigma_floor=floor)
        exact = exact_fn(x, mn, other, s64)
        assert torch.isfinite(out).all()
        assert_within_2x("log_ratio", out, ref, exact, ulps(exact.abs() + offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # (a bf16 step returns its mean rounded to bf16)
def test_zero_at_the_log_prob_of_the_ddim_step(dtype, gen):
    """log r of an action against the log-prob its own DDIM step recorded is 0 at unchanged parameters, also
    where the floor binds (sigma 0.01 < 0.1) and for float64 inputs: every path uses s = max(sigma, fp32(floor)).
    References: exactly 0; kernels: float64 sums in another order, |log r| <= 1e-9."""
    from ppo_ddpm.kernels import ddim_step, ddim_step_reference

    x_t, eps, noise = (randn((3, 3, 7, 5), gen, dtype=dtype).to(DEV) for _ in range(3))
    sig = torch.tensor([0.01, 0.3, 0.0], device=DEV)
    a_t, a_p = torch.tensor([0.5, 0.6, 0.7], device=DEV), torch.tensor([0.6, 0.8, 0.9], device=DEV)
    for step, log_ratio in ((ddim_step_reference, gaussian_log_ratio_from_logprob_reference), (ddim_step, gaussian_log_ratio_from_logprob)):
        x_prev, mean, lp = step(x_t, eps, a_t, a_p, sig, noise=noise, sigma_floor=0.1)
        for reduction in ("sum", "mean"):
            out = log_ratio(x_prev, mean, lp, sig, sigma_floor=0.1, reduction=reduction)
            if step is ddim_step_reference:
                assert torch.equal(out, torch.zeros_like(out)), (dtype, reduction, out)
            else:
                assert out.abs().max() <= 1e-9, (dtype, reduction, out)


def test_identical_means_give_zero_and_scalar_sigma(gen):
    x, mn, _, _ = make((3, 3, 7, 5), torch.bfloat16, gen)
    out = gaussian_log_ratio(x, mn, mn, 0.1)
    assert torch.equal(out, torch.zeros(3, device=DEV))


def test_gradcheck_references():
    """float64 gradcheck of both references, both reductions."""
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    mn = (x + 0.3 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    sigma = torch.tensor([0.7, 0.9], dtype=torch.float64)
    free = gaussian_log_ratio_reference(x, mn, mo, sigma).detach()
    c = 0.5 * (free[0].abs() + free[1].abs()).item()  # one sample clipped, the other not, away from c
    assert torch.autograd.gradcheck(lambda m: gaussian_log_ratio_reference(x, m, mo, sigma, per_step_clip=c), (mn,))
    old = torch.tensor([-20.0, -15.0], dtype=torch.float64)
    for reduction in ("sum", "mean"):  # float64 maths for float64 inputs: a plain gradcheck
        assert torch.autograd.gradcheck(
            lambda m: gaussian_log_ratio_from_logprob_reference(x, m, old, sigma.float(), per_step_clip=100.0, reduction=reduction),
            (mn,),
        )
        assert torch.autograd.gradcheck(lambda m: gaussian_log_ratio_reference(x, m, mo, sigma, reduction=reduction), (mn,))


def test_bad_inputs_name_the_argument(gen):
    x, mn, mo, sigma = make((3, 3, 7, 5), torch.float32, gen)
    with pytest.raises(ValueError, match="mu_old"):
        gaussian_log_ratio(x, mn, mo[:, :2], sigma)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_log_ratio(x, mn, mo, sigma[:2])
    with pytest.raises(ValueError, match="old_log_prob"):
        gaussian_log_ratio_from_logprob(x, mn, torch.zeros(2, device=DEV), sigma)
    for fn, other in ((gaussian_log_ratio, mo), (gaussian_log_ratio_from_logprob, torch.zeros(3, dtype=torch.float64, device=DEV)),
                      (gaussian_log_ratio_reference, mo), (gaussian_log_ratio_from_logprob_reference, torch.zeros(3, dtype=torch.float64))):
        with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'max'"):
            fn(x, mn, other, sigma, reduction="max")
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
