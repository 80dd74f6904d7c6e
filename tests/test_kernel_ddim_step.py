"""Fused DDIM step + log-prob vs float64 hand formulas and ddim_step_reference (Triton interpreter on CPU)."""
import math

import pytest
import torch
from kernel_checks import assert_within_2x, assert_within_bound, ddim_step_bounds, gen, poison, randn, ulps  # noqa: F401

from ppo_ddpm.ddpm.ddim import ddim_sigma
from ppo_ddpm.kernels import ddim_step, ddim_step_reference

pytestmark = pytest.mark.usefixtures("poison")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 3, 7, 5), (3, 3, 50, 50)]  # (3, 3, 50, 50): 2 chunks x 2 blocks per sample


def exact_ddim(x_t, eps, abar_t, abar_prev, sigma, z, score, clip_x0=None, sigma_floor=0.0):
    """float64 DDIM step (Song et al. eq. 12) and log N(x_prev; mean, s^2 I); z = noise or x_prev."""
    x, e, z = x_t.double(), eps.double(), z.double()
    view = lambda v: torch.as_tensor(v, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(-1, *[1] * (x.dim() - 1))  # noqa: E731
    a_t, a_p, sig = view(abar_t), view(abar_prev), view(sigma)
    x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
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
    assert out[0].dtype == out[1].dtype == dtype and out[2].dtype == torch.float32 and geps.dtype == dtype
    if score:
        assert torch.equal(out[0], z)
    for name, o, r, e in zip(("x_prev", "mean", "log_prob"), out, ref, exact):
        assert_within_2x(name, o, r, e, ulps(e, 1))
    assert_within_2x("d eps", geps, ref_geps, eps64.grad, ulps(eps64.grad, 1))
    bounds = ddim_step_bounds(x_t, eps, a_t, sig, z, score, exact, eps64.grad, grads, clip_x0)
    for name, o, e in zip(("x_prev", "mean", "log_prob", "d eps"), (*out, geps), (*exact, eps64.grad)):
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
    assert out[0].dtype == torch.float32 and torch.equal(out[0], z.float())
    for name, o, r, e in zip(("mean", "log_prob"), out[1:], ref[1:], exact[1:]):
        assert_within_2x(name, o, r, e, ulps(e, 1))


def test_noise_is_drawn_with_torch_randn_when_missing(gen):
    x_t, eps, a_t, a_p, sig, _ = make((3, 3, 7, 5), torch.float32, gen, score=False)
    torch.manual_seed(123)
    out = ddim_step(x_t, eps, a_t, a_p, sig)
    torch.manual_seed(123)
    noise = torch.randn(x_t.shape, device=DEV)
    torch.manual_seed(123)
    ref = ddim_step_reference(x_t, eps, a_t, a_p, sig)
    exact = exact_ddim(x_t, eps, a_t, a_p, sig, noise, score=False)
    for name, o, r, e in zip(("x_prev", "mean", "log_prob"), out, ref, exact):
        assert_within_2x(name, o, r, e, ulps(e, 1))


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
    for name, o, r, e in zip(("x_prev", "mean", "log_prob"), out, ref, exact):
        assert torch.isfinite(o).all()
        assert_within_2x(name, o, r, e, ulps(e, 1))


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
