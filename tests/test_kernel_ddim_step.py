"""Fused DDIM step + log-prob vs float64 hand formulas and ddim_step_reference (Triton interpreter on CPU).

The log-prob is float64 and scores x_prev as stored (rounded to its buffer's dtype, round to nearest
even), so its exact value is that of the kernel's own stored x_prev against the float64 mean."""
import math

import pytest
import torch
from kernel_checks import assert_within_2x, assert_within_bound, ddim_step_bounds, gen, poison, randn, ulps  # noqa: F401

from ppo_ddpm.ddpm.ddim import ddim_sigma
from ppo_ddpm.kernels import ddim_step, ddim_step_reference

pytestmark = pytest.mark.usefixtures("poison")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 3, 7, 5), (3, 3, 50, 50)]  # (3, 3, 50, 50): 2 chunks x 2 blocks per sample


def exact_ddim(x_t, eps, abar_t, abar_prev, sigma, z, score, clip_x0=None, sigma_floor=0.0, prediction_type="epsilon"):
    """float64 DDIM step (Song et al. eq. 12) and log N(x_prev; mean, s^2 I); z = noise or x_prev.
    ``eps`` is the model output o, read as ``prediction_type`` (hand formulas, as diffusers' DDIMScheduler)."""
    x, o, z = x_t.double(), eps.double(), z.double()
    view = lambda v: torch.as_tensor(v, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(-1, *[1] * (x.dim() - 1))  # noqa: E731
    a_t, a_p, sig = view(abar_t), view(abar_prev), view(sigma)
    if prediction_type == "epsilon":
        x0, e = (x - (1 - a_t).sqrt() * o) / a_t.sqrt(), o
    elif prediction_type == "sample":
        x0, e = o, (x - a_t.sqrt() * o) / (1 - a_t).sqrt()
    else:
        x0, e = a_t.sqrt() * x - (1 - a_t).sqrt() * o, a_t.sqrt() * o + (1 - a_t).sqrt() * x
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = a_p.sqrt() * x0 + (1 - a_p - sig**2).clamp_min(0).sqrt() * e
    x_prev = z if score else mean + sig * z
    s = sig.reshape(-1).clamp_min(sigma_floor)
    D = x[0].numel()
    lp = -((x_prev - mean) ** 2).flatten(1).sum(1) / (2 * s * s) - D * s.log() - 0.5 * D * math.log(2 * math.pi)
    return x_prev, mean, lp


def schedule(B, gen, eta_min=0.3):
    """abar_t < abar_prev < 1 and DDIM sigmas with eta in [eta_min, 1] per sample (float32 [B])."""
    a_t = 0.05 + 0.85 * torch.rand(B, generator=gen, dtype=torch.float64)
    a_p = a_t + (0.99 - a_t) * torch.rand(B, generator=gen, dtype=torch.float64)
    eta = eta_min + (1 - eta_min) * torch.rand(B, generator=gen, dtype=torch.float64)
    return [v.float().to(DEV) for v in (a_t, a_p, ddim_sigma(a_t, a_p, 1.0) * eta)]


def make(shape, dtype, gen, score):
    a_t, a_p, sig = schedule(shape[0], gen)
    x_t, eps = randn(shape, gen, dtype=dtype).to(DEV), randn(shape, gen, dtype=dtype).to(DEV)
    z = randn(shape, gen).to(DEV)
    if score:  # a plausible cached action: the exact mean plus sigma-scaled noise, in the state dtype
        z = exact_ddim(x_t, eps, a_t, a_p, sig, z, score=False)[0].to(dtype)
    return x_t, eps, a_t, a_p, sig, z


def f64_ulps(x: torch.Tensor, n: float = 64.0) -> float:
    """n float64 ulps of the largest |x|: the slack of float64 log-probs (summation order only)."""
    return n * torch.finfo(torch.float64).eps * max(x.detach().double().abs().max().item(), 1e-300)


def hand_log_prob64(x_prev, mean, sigma, sigma_floor=0.0):
    """log N(x_prev; mean, s^2 I) in float64 of the given (stored) values, s = max(sigma, fp32(sigma_floor))."""
    s = torch.as_tensor(sigma, dtype=torch.float32).expand(x_prev.shape[0]).clamp_min(sigma_floor).double().cpu()
    D = x_prev[0].numel()
    sq = (x_prev.double() - mean.double()).flatten(1).pow(2).sum(1).cpu()
    return -sq / (2 * s * s) - D * s.log() - 0.5 * D * math.log(2 * math.pi)


def check_log_prob(fn, out, x_t, eps, a_t, a_p, sig, z, score, sigma_floor=0.0, **kw):
    """out[2] (float64) is exactly the log-prob of out[0] (x_prev as stored) against the float32 mean ``fn``
    computed: for fp32 inputs its returned mean; for bf16/fp16 inputs that of the same values upcast (both
    compute in fp32 from the loaded values)."""
    assert out[2].dtype == torch.float64
    mean32 = out[1] if x_t.dtype == torch.float32 else fn(x_t.float(), eps.detach().float(), a_t, a_p, sig, **(
        {"x_prev": z.float()} if score else {"noise": z.float()}), sigma_floor=sigma_floor, **kw)[1]
    want = hand_log_prob64(out[0], mean32, sig, sigma_floor)
    err = (out[2].detach().cpu() - want).abs().max().item()
    assert err <= f64_ulps(want), f"log_prob: {err:.3g} from the float64 log-prob of its own x_prev and mean"


def run(fn, x_t, eps, a_t, a_p, sig, z, score, grads, **kw):
    """Outputs and d(sum gx * x_prev + sum gm * mean + sum glp * log_prob) / d eps."""
    eps = eps.detach().clone().requires_grad_(True)
    out = fn(x_t, eps, a_t, a_p, sig, **({"x_prev": z} if score else {"noise": z}), **kw)
    gx, gm, glp = grads
    loss = (out[1].double() * gm).sum() + (out[2].double() * glp).sum()
    if not score:
        loss = loss + (out[0].double() * gx).sum()
    loss.backward()
    return [o.detach() for o in out], eps.grad


@pytest.mark.parametrize("score", [False, True], ids=["noise", "x_prev"])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_and_reference(dtype, shape, clip_x0, score, gen):
    x_t, eps, a_t, a_p, sig, z = make(shape, dtype, gen, score)
    grads = (randn(shape, gen).to(DEV), randn(shape, gen).to(DEV), randn(shape[:1], gen, 1e-3).to(DEV))
    out, geps = run(ddim_step, x_t, eps, a_t, a_p, sig, z, score, grads, clip_x0=clip_x0)
    ref, ref_geps = run(ddim_step_reference, x_t, eps, a_t, a_p, sig, z, score, grads, clip_x0=clip_x0)
    eps64 = eps.double().requires_grad_(True)
    exact = exact_ddim(x_t, eps64, a_t, a_p, sig, z, score, clip_x0)
    loss = (exact[1] * grads[1]).sum() + (exact[2] * grads[2]).sum() + (0 if score else (exact[0] * grads[0]).sum())
    loss.backward()
    assert out[0].dtype == out[1].dtype == dtype and out[2].dtype == torch.float64 and geps.dtype == dtype
    if score:
        assert torch.equal(out[0], z)
    for name, o, r, e in zip(("x_prev", "mean"), out, ref, exact):
        assert_within_2x(name, o, r, e, ulps(e, 1))
    # log-prob: float64-exact for the values it scores (x_prev as stored, the float32 mean)
    check_log_prob(ddim_step, out, x_t, eps, a_t, a_p, sig, z, score, clip_x0=clip_x0)
    check_log_prob(ddim_step_reference, ref, x_t, eps, a_t, a_p, sig, z, score, clip_x0=clip_x0)
    assert_within_2x("d eps", geps, ref_geps, eps64.grad, ulps(eps64.grad, 1))
    bounds = ddim_step_bounds(x_t, eps, a_t, sig, z, score, exact, eps64.grad, grads, clip_x0)
    for name, o, e in zip(("x_prev", "mean", "log_prob", "d eps"), (*out, geps), (*exact, eps64.grad)):
        if name == "log_prob" and not score and dtype != torch.float32:
            continue  # it scores x_prev rounded to bf16/fp16, not the exact one: check_log_prob above pins it
        assert_within_bound(name, o, e, bounds[name])


def test_log_prob_does_not_depend_on_eps_when_sampling(gen):
    """x_prev - mean = sigma noise: the gradient reaches eps only through x_prev and mean."""
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float32, gen, score=False)
    eps = eps.requires_grad_(True)
    _, _, lp = ddim_step(x_t, eps, a_t, a_p, sig, noise=z)
    (g,) = torch.autograd.grad(lp.sum(), eps, allow_unused=True, materialize_grads=True)
    assert torch.equal(g, torch.zeros_like(eps))


def test_score_mode_with_a_cached_bf16_action(gen):
    """fp32 network, bf16 rollout cache: x_prev is returned in x_t's dtype, scored as given."""
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float32, gen, score=True)
    z = z.bfloat16()
    out = ddim_step(x_t, eps, a_t, a_p, sig, x_prev=z)
    ref = ddim_step_reference(x_t, eps, a_t, a_p, sig, x_prev=z)
    exact = exact_ddim(x_t, eps, a_t, a_p, sig, z, score=True)
    assert out[0].dtype == torch.float32 and torch.equal(out[0], z.float()) and out[2].dtype == torch.float64
    assert_within_2x("mean", out[1], ref[1], exact[1], ulps(exact[1], 1))
    check_log_prob(ddim_step, out, x_t, eps, a_t, a_p, sig, z, True)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_out_buffer_receives_x_prev_scored_as_stored(out_dtype, gen):
    """fp32 network, ``out`` = a cache state of any float dtype: x_prev is written there (and returned: the
    same storage), rounded to nearest even from the fp32 value, and the log-prob scores that stored value."""
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float32, gen, score=False)
    buf = torch.full(x_t.shape, float("nan"), dtype=out_dtype, device=DEV)
    out = ddim_step(x_t, eps, a_t, a_p, sig, noise=z, sigma_floor=0.05, out=buf)
    ref_buf = torch.full_like(buf, float("nan"))
    ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=z, sigma_floor=0.05, out=ref_buf)
    free = ddim_step(x_t, eps, a_t, a_p, sig, noise=z, sigma_floor=0.05)  # x_prev in x_t's dtype: fp32
    assert out[0].data_ptr() == buf.data_ptr() and torch.equal(out[0], buf) and out[0].dtype == out_dtype
    assert out[1].dtype == torch.float32
    assert torch.equal(out[1], free[1])
    # the stored value is the fp32 x_prev rounded by torch's own cast (round to nearest even)
    assert torch.equal(buf, free[0].to(out_dtype))
    exact = exact_ddim(x_t, eps, a_t, a_p, sig, z, score=False)
    assert_within_2x("x_prev", buf, ref_buf, exact[0], ulps(exact[0], 1))
    check_log_prob(ddim_step, out, x_t, eps, a_t, a_p, sig, z, False, sigma_floor=0.05)
    if out_dtype != torch.float32:
        assert (out[2] - free[2]).abs().max() > 1e-3  # the log-prob is that of the rounded value
    # scoring the stored action reproduces the sampling log-prob (log r = 0 at unchanged params)
    again = ddim_step(x_t, eps, a_t, a_p, sig, x_prev=buf, sigma_floor=0.05)
    assert (again[2] - out[2]).abs().max() <= f64_ulps(out[2], 16)


@pytest.mark.parametrize("via", ["out", "x_t"])
def test_bf16_rounding_is_round_to_nearest_even(via):
    """x_prev = 1 + 0.5 z exactly in fp32 (x_t = 1, eps = 0, abar_t = abar_prev = 0.25, sigma = 0.5: x0 = 2,
    mean = 1), with z putting x_prev on the ties 1 + (2k+1) 2^-8 between bf16 neighbours 1 + k 2^-7: round to
    nearest even gives 1 + (k + k % 2) 2^-7, truncation would give 1 + k 2^-7. Under the interpreter the
    kernel rounds by bit arithmetic (``_dispatch.cast_rne``); on a GPU by the hardware cast."""
    k = torch.arange(8, dtype=torch.float64)
    ties = 1 + (2 * k + 1) / 256
    above, below = ties + 2.0**-12, ties - 2.0**-12  # not ties: nearest
    values = torch.cat([ties, above, below, -ties, torch.tensor([1.0, 1 + 2.0**-7])])
    D = values.numel()
    z = ((values - 1) / 0.5).float().reshape(1, 1, 1, D).to(DEV)
    dtype = torch.float32 if via == "out" else torch.bfloat16
    x_t = torch.ones(1, 1, 1, D, dtype=dtype, device=DEV)
    eps = torch.zeros_like(x_t)
    a, sig = torch.tensor([0.25], device=DEV), torch.tensor([0.5], device=DEV)
    buf = torch.empty(1, 1, 1, D, dtype=torch.bfloat16, device=DEV) if via == "out" else None
    x_prev, mean, lp = ddim_step(x_t, eps, a, a, sig, noise=z, out=buf)
    assert x_prev.dtype == torch.bfloat16 and torch.equal(mean.float(), torch.ones(1, 1, 1, D, device=DEV))
    exact32 = (1 + 0.5 * z).flatten()  # exact in fp32
    assert torch.equal(exact32.double(), (1 + 0.5 * z.double()).flatten())
    rne = exact32.to(torch.bfloat16)  # torch's cast: round to nearest even
    assert torch.equal(rne[:8].double().cpu(), 1 + (k + k % 2) / 128)  # by hand
    truncated = (exact32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(rne, truncated)  # the test tells the two roundings apart
    assert torch.equal(x_prev.flatten(), rne)
    # the log-prob is that of the stored (rounded) value, float64 throughout
    want = -((rne.double() - 1) ** 2).sum() / (2 * 0.25) - D * math.log(0.5) - 0.5 * D * math.log(2 * math.pi)
    assert abs(lp.item() - want.item()) <= 1e-12 * abs(want.item())


def test_log_normaliser_is_float64_in_kernel(gen):
    """3x32x32 at s = 0.01: D (log s + 1/2 log 2 pi) ~ -1.1e4, where one fp32 rounding is ~1e-3. The kernel's
    log-prob equals the float64 hand value to ~1e-9, for a sampled and for a given action."""
    shape = (2, 3, 32, 32)
    x_t, eps = randn(shape, gen).to(DEV), randn(shape, gen).to(DEV)
    a_t, a_p = torch.tensor([0.5, 0.6], device=DEV), torch.tensor([0.9, 0.95], device=DEV)
    sig = torch.tensor([0.01, 0.0], device=DEV)  # sample 1: sigma 0, scored at the floor
    floor = 0.01
    z = randn(shape, gen).to(DEV)
    for kw in ({"noise": z}, {"x_prev": x_t + 0.01 * z}):
        x_prev, mean, lp = ddim_step(x_t, eps, a_t, a_p, sig, sigma_floor=floor, **kw)
        want = hand_log_prob64(x_prev, mean, sig, floor)
        assert want.abs().min() > 5e3
        assert (lp.cpu() - want).abs().max() <= 1e-9, (lp.cpu() - want)


def test_out_is_refused_where_it_cannot_apply(gen):
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float32, gen, score=False)
    buf = torch.empty_like(x_t)
    with pytest.raises(ValueError, match="out"):
        ddim_step(x_t, eps, a_t, a_p, sig, x_prev=z, out=buf)
    with pytest.raises(ValueError, match="out must be a contiguous floating tensor of shape"):
        ddim_step(x_t, eps, a_t, a_p, sig, noise=z, out=buf[:2])
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ddim_step(x_t, eps, a_t, a_p, sig, noise=z, out=torch.empty(3, 3, 5, 7, device=DEV).transpose(2, 3))
    with pytest.raises(ValueError, match="out must be a contiguous floating"):
        ddim_step(x_t, eps, a_t, a_p, sig, noise=z, out=torch.empty(x_t.shape, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="without grad"):
        ddim_step(x_t, eps.requires_grad_(True), a_t, a_p, sig, noise=z, out=buf)
    with torch.no_grad():  # the rollout: eps of a trainable model, no graph
        ddim_step(x_t, eps, a_t, a_p, sig, noise=z, out=buf)


def test_noise_is_drawn_with_torch_randn_when_missing(gen):
    x_t, eps, a_t, a_p, sig, _ = make((3, 3, 7, 5), torch.float32, gen, score=False)
    torch.manual_seed(123)
    out = ddim_step(x_t, eps, a_t, a_p, sig)
    torch.manual_seed(123)
    noise = torch.randn(x_t.shape, device=DEV)
    torch.manual_seed(123)
    ref = ddim_step_reference(x_t, eps, a_t, a_p, sig)
    exact = exact_ddim(x_t, eps, a_t, a_p, sig, noise, score=False)
    for name, o, r, e in zip(("x_prev", "mean"), out, ref, exact):
        assert_within_2x(name, o, r, e, ulps(e, 1))
    check_log_prob(ddim_step, out, x_t, eps, a_t, a_p, sig, noise, False)


@pytest.mark.parametrize("score", [False, True], ids=["noise", "x_prev"])
def test_sigma_zero_uses_the_floor(score, gen):
    """Deterministic DDIM (eta = 0, last step abar_prev = 1): sigma = 0, log-prob with s = sigma_floor."""
    shape = (3, 3, 7, 5)
    x_t, eps, a_t, _, _, _ = make(shape, torch.float32, gen, score=False)
    a_p = torch.tensor([1.0, 0.9, 0.999], device=DEV).maximum(a_t)
    sig = torch.zeros(3, device=DEV)
    floor = 0.05
    z = randn(shape, gen).to(DEV)
    if score:
        z = exact_ddim(x_t, eps, a_t, a_p, sig, z, False)[1].float() + floor * z
    out = ddim_step(x_t, eps, a_t, a_p, sig, **({"x_prev": z} if score else {"noise": z}), sigma_floor=floor)
    ref = ddim_step_reference(x_t, eps, a_t, a_p, sig, **({"x_prev": z} if score else {"noise": z}), sigma_floor=floor)
    exact = exact_ddim(x_t, eps, a_t, a_p, sig, z, score, sigma_floor=floor)
    if not score:
        assert torch.equal(out[0], out[1])  # x_prev = mean
        D = x_t[0].numel()
        assert torch.allclose(out[2].double(), torch.full((3,), -D * math.log(floor) - 0.5 * D * math.log(2 * math.pi), dtype=torch.float64, device=DEV))
    for name, o, r, e in zip(("x_prev", "mean"), out, ref, exact):
        assert torch.isfinite(o).all()
        assert_within_2x(name, o, r, e, ulps(e, 1))
    check_log_prob(ddim_step, out, x_t, eps, a_t, a_p, sig, z, score, sigma_floor=floor)


def test_clip_boundary_keeps_the_gradient(gen):
    """x0 exactly on +-clip_x0 is not clamped (as torch.clamp): d mean / d eps = dir - k there."""
    shape = (1, 2, 2, 2)
    a_t, a_p, sig = (torch.tensor([v], device=DEV) for v in (0.25, 0.64, 0.3))
    # sqrt(a_t) = 0.5, sqrt(1 - a_t) = sqrt(.75): x0 = 2 x_t - 2 sqrt(.75) eps; eps = 0 gives x0 = 2 x_t
    x_t = torch.tensor([0.5, -0.5, 0.25, 1.0, -1.0, 0.0, 0.125, 0.75], device=DEV).reshape(shape)
    eps = torch.zeros(shape, device=DEV, requires_grad=True)
    _, mean, _ = ddim_step(x_t, eps, a_t, a_p, sig, noise=torch.zeros(shape, device=DEV), clip_x0=1.0)
    mean.sum().backward()
    dir_coef, k = math.sqrt(1 - 0.64 - 0.09), 0.8 * math.sqrt(0.75) / 0.5
    inside = (2 * x_t).abs() <= 1.0  # |x0| = 1 exactly for x_t = +-0.5
    expected = torch.where(inside, dir_coef - k, dir_coef)
    assert inside.flatten().tolist() == [True, True, True, False, False, True, True, False]
    assert torch.allclose(eps.grad.double(), expected.double(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(mean.double(), 0.8 * (2 * x_t).clamp(-1, 1).double(), rtol=1e-6)


def test_gradcheck_reference():
    """ddim_step_reference computes in fp32, so its eps-gradient is checked by central differences with a
    large step, exact for mean (linear in eps) and log_prob (quadratic in eps)."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x_prev = torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64)
    a_t, a_p, sig = torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.8]), torch.tensor([0.4, 0.3])
    fn = lambda e: ddim_step_reference(x_t, e, a_t, a_p, sig, x_prev=x_prev)[1:]  # noqa: E731
    assert torch.autograd.gradcheck(lambda e: tuple(o.double() for o in fn(e)), (eps,), eps=0.05, atol=2e-3, rtol=1e-3)


def test_bad_inputs_name_the_argument(gen):
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float32, gen, score=False)
    with pytest.raises(ValueError, match="either noise or x_prev"):
        ddim_step(x_t, eps, a_t, a_p, sig, noise=z, x_prev=z)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x_t, eps, a_t, a_p, sig, noise=z[:, :2])
    with pytest.raises(ValueError, match="abar_prev"):
        ddim_step(x_t, eps, a_t, a_p[:2], sig, noise=z)
    with pytest.raises(ValueError, match="x_t requires grad"):
        ddim_step(x_t.requires_grad_(True), eps, a_t, a_p, sig, noise=z)


def test_bytes_moved():
    from ppo_ddpm.kernels import ddim_step_bytes

    x, z = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16), torch.empty(4, 3, 8, 8)
    n = 768
    assert ddim_step_bytes(x, x, z, score=False) == n * (2 + 2 + 4 + 2 + 2)
    assert ddim_step_bytes(x, x, x, score=True) == n * 8
    assert ddim_step_bytes(x, x, x, score=True, backward=True) == n * 8
    assert ddim_step_bytes(x, x, z, score=False, backward=True) == n * 4
    assert ddim_step_bytes(x, x, z, score=False, backward=True, clip_x0=True) == n * 8


@pytest.mark.parametrize("score", [False, True], ids=["noise", "x_prev"])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_prediction_types_match_float64_and_reference(prediction_type, dtype, clip_x0, score, gen):
    """x0_hat / eps_hat from a sample or v output, forward and d o, against float64 hand maths."""
    shape = SHAPES[1]
    x_t, out, a_t, a_p, sig, z = make(shape, dtype, gen, score=False)
    if score:
        z = exact_ddim(x_t, out, a_t, a_p, sig, z, False, prediction_type=prediction_type)[0].to(dtype)
    grads = (randn(shape, gen).to(DEV), randn(shape, gen).to(DEV), randn(shape[:1], gen, 1e-3).to(DEV))
    kw = dict(clip_x0=clip_x0, prediction_type=prediction_type)
    got, g_out = run(ddim_step, x_t, out, a_t, a_p, sig, z, score, grads, **kw)
    ref, ref_g = run(ddim_step_reference, x_t, out, a_t, a_p, sig, z, score, grads, **kw)
    out64 = out.double().requires_grad_(True)
    exact = exact_ddim(x_t, out64, a_t, a_p, sig, z, score, clip_x0, prediction_type=prediction_type)
    loss = (exact[1] * grads[1]).sum() + (exact[2] * grads[2]).sum() + (0 if score else (exact[0] * grads[0]).sum())
    loss.backward()
    for name, o, r, e in zip(("x_prev", "mean", "log_prob"), got, ref, exact):
        assert_within_2x(name, o, r, e, ulps(e, 1))
    assert_within_2x("d output", g_out, ref_g, out64.grad, ulps(out64.grad, 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_are_one_step_in_three_parameterisations(prediction_type, gen):
    """The same (x0_hat, eps_hat) written as each output type gives the same step: o = eps_hat,
    x0_hat or v = sqrt(a) eps_hat - sqrt(1 - a) x0_hat (hand conversion, float64)."""
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float64, gen, score=False)
    a = a_t.double().view(-1, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    want = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=z)
    got = ddim_step(x_t.float(), out.float(), a_t, a_p, sig, noise=z.float(), prediction_type=prediction_type)
    for w, g in zip(want, got):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-4, rtol=1e-5)


def test_unknown_prediction_type_names_the_key(gen):
    x_t, eps, a_t, a_p, sig, z = make((3, 3, 7, 5), torch.float32, gen, score=False)
    for fn in (ddim_step, ddim_step_reference):
        with pytest.raises(ValueError, match="model.prediction_type .* got 'x0'"):
            fn(x_t, eps, a_t, a_p, sig, noise=z, prediction_type="x0")
