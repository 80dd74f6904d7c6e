"""Fused trajectory PPO reduction vs a float64 hand formula (Triton interpreter on CPU), both gradient
masks (``strict``, ``ppo`` = autograd of the min form through the clamps)."""
import pytest
import torch
from kernel_checks import assert_within_2x, assert_within_bound, gen, poison, randn, trajectory_bounds, ulps  # noqa: F401

from ppo_ddpm.kernels import TrajectoryPPO, trajectory_ppo, trajectory_ppo_reference

pytestmark = pytest.mark.usefixtures("poison")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
STATS = ("clipfrac", "step_clipfrac", "global_clipfrac")
SETTINGS = [
    dict(clip_range=0.2),
    dict(clip_range=0.1, per_step_clip=0.05),
    dict(clip_range=0.1, global_clip=0.3),
    dict(clip_range=0.15, per_step_clip=0.08, global_clip=0.25),
]


def exact_trajectory(l, adv, clip_range, per_step_clip=None, global_clip=None, grad_mask="strict"):
    """float64, term by term: returns (loss, log r, r, mask, weights, stats)."""
    l, adv = l.double(), adv.double()
    T, B = l.shape
    c = float("inf") if per_step_clip is None else per_step_clip
    G = float("inf") if global_clip is None else global_clip
    step_hit = l.abs() > c
    total = torch.minimum(torch.maximum(l, torch.tensor(-c)), torch.tensor(c)).sum(0)
    global_hit = total.abs() > G
    log_r = torch.minimum(torch.maximum(total, torch.tensor(-G)), torch.tensor(G))
    r = log_r.exp()
    outside = (r < 1 - clip_range) | (r > 1 + clip_range)
    if grad_mask == "strict":  # nothing clipped
        mask = ~step_hit.any(0) & ~global_hit & ~outside
    else:  # standard PPO: the min picks the unclipped term, and the global clip is not active
        mask = ~global_hit & ~(((adv > 0) & (r > 1 + clip_range)) | ((adv < 0) & (r < 1 - clip_range)))
    unclipped, clipped = r * adv, torch.minimum(torch.maximum(r, torch.tensor(1 - clip_range)), torch.tensor(1 + clip_range)) * adv
    loss = -torch.minimum(unclipped, clipped).sum() / B
    weights = torch.where(mask, -adv * r / B, torch.zeros_like(r))
    stats = dict(zip(STATS, (outside.double().mean(), step_hit.double().sum() / (T * B), global_hit.double().mean())))
    return loss, log_r, r, mask, weights, stats


def inputs(T, B, gen, dtype=torch.float32, scale=0.05):
    return randn((T, B), gen, scale, dtype).to(DEV), randn((B,), gen).to(DEV)


def check(out: TrajectoryPPO, ref: TrajectoryPPO, exact, l, adv, per_step_clip=None):
    loss, log_r, r, mask, weights, stats = exact
    bounds = trajectory_bounds(l, adv, loss, log_r, weights, stats, per_step_clip)  # the clip's fp32 rounding too
    for name, o, e in (("loss", out.loss, loss), ("log_ratio", out.log_ratio, log_r), ("weights", out.weights, weights)):
        assert_within_bound(name, o, e, bounds[name])
    for k in STATS:
        assert_within_bound(k, out.stats[k], stats[k], bounds[k])
    assert isinstance(out, TrajectoryPPO) and out.mask.dtype == torch.bool and not hasattr(out, "ratio")
    assert out.loss.dim() == 0 and set(out.stats) == set(STATS) and all(out.stats[k].dim() == 0 for k in STATS)
    assert torch.equal(out.mask, mask) and torch.equal(ref.mask, mask)
    for name, o, rr, e in (("loss", out.loss, ref.loss, loss), ("log_ratio", out.log_ratio, ref.log_ratio, log_r), ("weights", out.weights, ref.weights, weights)):
        assert o.dtype == torch.float32, name
        assert_within_2x(name, o, rr, e, ulps(e))
    for k in STATS:
        assert_within_2x(k, out.stats[k], ref.stats[k], stats[k], ulps(stats[k]) + 1e-12)


@pytest.mark.parametrize("grad_mask", ["strict", "ppo"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "step_clip", "global_clip", "both"])
@pytest.mark.parametrize("T,B", [(5, 3), (50, 300), (1, 1)])  # (50, 300): 2 programs x 25 tiles of T
def test_matches_float64(T, B, settings, grad_mask, gen):
    l, adv = inputs(T, B, gen)
    s = dict(settings, grad_mask=grad_mask)
    check(trajectory_ppo(l, adv, **s), trajectory_ppo_reference(l, adv, **s), exact_trajectory(l, adv, **s), l, adv,
          s.get("per_step_clip"))


@pytest.mark.parametrize("grad_mask", ["strict", "ppo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_bf16_and_float64_log_ratios(dtype, grad_mask, gen):
    """l is loaded in its own dtype (float64: the trainer's ratio pass) and summed in float64."""
    l, adv = inputs(7, 33, gen, dtype)
    s = dict(SETTINGS[3], grad_mask=grad_mask)
    check(trajectory_ppo(l, adv, **s), trajectory_ppo_reference(l, adv, **s), exact_trajectory(l, adv, **s), l, adv,
          s.get("per_step_clip"))


def test_float64_log_ratios_are_not_rounded_to_float32():
    """Per-step l = 0.5 + 1e-9 and -0.5: the float64 sum is 1e-9 (float32 rounding of the steps would give 0)."""
    l = torch.tensor([[0.5 + 1e-9, 0.25], [-0.5, -0.25 + 3e-9]], dtype=torch.float64, device=DEV)
    assert float(l.float().sum(0)[0]) == 0.0
    out = trajectory_ppo(l, torch.ones(2, device=DEV), clip_range=0.2)
    want = torch.tensor([1e-9, 3e-9], dtype=torch.float64).float()
    assert torch.equal(out.log_ratio.cpu(), want)


def test_clips_exactly_on_the_boundary_are_not_active():
    """|l| == c, |sum| == G and r == 1 +- e keep the gradient; one fp32 ulp beyond clips."""
    up = lambda v: torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))).item()  # noqa: E731
    c, G = 0.0625, 0.125  # exact in fp32
    l = torch.tensor([[c, up(c), -c, 0.0], [0.0, 0.0, -c, 0.0]], device=DEV)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], device=DEV)
    out = trajectory_ppo(l, adv, clip_range=0.5, per_step_clip=c, global_clip=G)
    assert out.mask.tolist() == [True, False, True, True]
    assert out.log_ratio.tolist() == [c, c, -G, 0.0] and out.stats["step_clipfrac"].item() == 1 / 8
    assert out.stats["global_clipfrac"].item() == 0.0
    out = trajectory_ppo(l, adv, clip_range=0.5, per_step_clip=c, global_clip=torch.nextafter(torch.tensor(G), torch.tensor(0.0)).item())
    assert out.mask.tolist() == [True, False, False, True] and out.stats["global_clipfrac"].item() == 0.25
    # ratio exactly 1 with a zero clip range is inside [1, 1]
    out = trajectory_ppo(torch.zeros(3, 2, device=DEV), torch.ones(2, device=DEV), clip_range=0.0)
    assert out.mask.all() and out.stats["clipfrac"].item() == 0.0 and torch.equal(out.weights, torch.full((2,), -0.5, device=DEV))
    # ratio exactly on 1 + e (e taken from the kernel's own fp32 ratio), then one ulp outside
    l = torch.tensor([[0.03, -0.02]], device=DEV)
    r = torch.exp(trajectory_ppo(l, torch.ones(2, device=DEV), clip_range=0.5).log_ratio.double())[0].float().item()
    assert trajectory_ppo(l, torch.ones(2, device=DEV), clip_range=r - 1).mask.tolist() == [True, True]
    below = torch.nextafter(torch.tensor(r), torch.tensor(0.0)).item()
    out = trajectory_ppo(l, torch.ones(2, device=DEV), clip_range=below - 1)
    assert out.mask.tolist() == [False, True] and out.stats["clipfrac"].item() == 0.5


def test_zero_advantage_gives_zero_loss_and_weights(gen):
    l, _ = inputs(6, 5, gen)
    out = trajectory_ppo(l, torch.zeros(5, device=DEV), **SETTINGS[3])
    assert out.loss.item() == 0.0 and torch.equal(out.weights.abs(), torch.zeros(5, device=DEV))
    exact = exact_trajectory(l, torch.zeros(5, device=DEV), **SETTINGS[3])
    assert torch.equal(out.mask, exact[3])


def test_weights_are_the_gradient_where_nothing_was_clipped(gen):
    """weights_b == d loss / d l_{t,b} (float64 autograd of the reference) for every step of an unclipped
    sample; zero wherever a clip is active, even where autograd of the min form is not (stricter)."""
    T, B = 4, 64
    l, adv = inputs(T, B, gen, scale=0.04)
    settings = dict(clip_range=0.1, per_step_clip=0.07, global_clip=0.15)
    out = trajectory_ppo(l, adv, **settings)
    l64 = l.double().requires_grad_(True)
    trajectory_ppo_reference(l64, adv.double(), **settings).loss.backward()
    grad = l64.grad
    m = out.mask
    assert 0 < m.sum() < B  # both kinds of samples occur
    assert torch.allclose(grad[:, m], out.weights[m].double().expand(T, -1), rtol=1e-6, atol=1e-9)
    assert (out.weights[~m] == 0).all()
    step_hit = (l.abs() > 0.07).any(0) & ~m.new_zeros(B)
    partial = step_hit & (grad != 0).any(0)  # autograd still flows through the unclipped steps there
    assert partial.any() and (out.weights[partial] == 0).all()


def min_form_loss(l, adv, clip_range, per_step_clip=None, global_clip=None):
    """PPO's min-form loss written directly (no kernel helpers): -mean_b min(r_b A_b, clip(r_b) A_b) with
    log r_b = clamp(sum_t clamp(l_tb, +-c), +-G); torch.clamp gives zero gradient where a clamp acts."""
    c = float("inf") if per_step_clip is None else per_step_clip
    G = float("inf") if global_clip is None else global_clip
    log_r = torch.clamp(torch.clamp(l, -c, c).sum(0), -G, G)
    r = torch.exp(log_r)
    return -torch.minimum(r * adv, torch.clamp(r, 1 - clip_range, 1 + clip_range) * adv).mean()


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "step_clip", "global_clip", "both"])
def test_ppo_mask_is_autograd_of_the_min_form(settings, gen):
    """grad_mask='ppo': d loss / d l_tb (float64 autograd of the min form through both clamps) equals
    weights_b where |l_tb| <= c, and 0 on the per-step clipped steps, for every step of every sample."""
    T, B = 4, 256
    l, adv = inputs(T, B, gen, scale=0.06)
    l64 = l.double().requires_grad_(True)
    min_form_loss(l64, adv.double(), **settings).backward()
    grad = l64.grad
    for fn in (trajectory_ppo, trajectory_ppo_reference):
        out = fn(l, adv, **settings, grad_mask="ppo")
        c = settings.get("per_step_clip") or float("inf")
        step_kept = (l.abs() <= c).double()
        torch.testing.assert_close(out.weights.double()[None, :] * step_kept, grad, rtol=1e-6, atol=1e-12)
        seen = (adv != 0) & (step_kept > 0).any(0)  # samples whose mask autograd can show
        assert torch.equal(out.mask[seen], (grad != 0).any(0)[seen])
    # every kind of sample occurs: kept, and dropped by the ratio clip (both signs of A), by the global clip
    r = torch.exp(exact_trajectory(l, adv, **settings)[1])
    e = settings["clip_range"]
    assert ((r > 1 + e) & (adv > 0)).any() and ((r < 1 - e) & (adv < 0)).any()  # min picks the clipped term
    assert ((r > 1 + e) & (adv < 0)).any() and ((r < 1 - e) & (adv > 0)).any()  # min picks r A: gradient flows
    if "per_step_clip" in settings:
        assert ((l.abs() > settings["per_step_clip"]).any(0) & (grad != 0).any(0)).any()  # partial samples
    if "global_clip" in settings:
        assert exact_trajectory(l, adv, **settings)[5]["global_clipfrac"] > 0  # dropped by the global clip


def test_strict_mask_is_stricter_than_ppo(gen):
    """strict keeps only samples where nothing was clipped; ppo keeps a superset (the min form's rule)."""
    l, adv = inputs(4, 256, gen, scale=0.06)
    kw = SETTINGS[3]
    strict, ppo = trajectory_ppo(l, adv, **kw, grad_mask="strict"), trajectory_ppo(l, adv, **kw, grad_mask="ppo")
    assert bool((strict.mask <= ppo.mask).all()) and int(strict.mask.sum()) < int(ppo.mask.sum())
    both = strict.mask
    assert torch.equal(strict.weights[both], ppo.weights[both])
    assert torch.equal(strict.loss, ppo.loss) and all(torch.equal(strict.stats[k], ppo.stats[k]) for k in STATS)


def test_gradcheck_reference(gen):
    l = randn((3, 4), gen, 0.02, torch.float64).requires_grad_(True)
    adv = randn((4,), gen, dtype=torch.float64)
    fn = lambda x: trajectory_ppo_reference(x, adv, clip_range=0.2, per_step_clip=1.0, global_clip=2.0).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (l,))
    assert torch.autograd.gradcheck(lambda x: trajectory_ppo_reference(x, adv, clip_range=0.2, grad_mask="ppo").log_ratio, (l,))


def test_cpu_dispatch_and_bad_inputs(gen):
    l, adv = inputs(3, 4, gen)
    with pytest.raises(ValueError, match="log_ratio_steps"):
        trajectory_ppo(l[0], adv, clip_range=0.2)
    with pytest.raises(ValueError, match="advantages"):
        trajectory_ppo(l, adv[:3], clip_range=0.2)
    with pytest.raises(ValueError, match="clip_range"):
        trajectory_ppo(l, adv, clip_range=-0.1)
    with pytest.raises(ValueError, match="per_step_clip"):
        trajectory_ppo(l, adv, clip_range=0.2, per_step_clip=0.0)
    for fn in (trajectory_ppo, trajectory_ppo_reference):
        with pytest.raises(ValueError, match=r"grad_mask must be one of \['strict', 'ppo'\], got 'min'"):
            fn(l, adv, clip_range=0.2, grad_mask="min")


def test_bytes_moved():
    from ppo_ddpm.kernels import trajectory_ppo_bytes

    # read l [T, B] (its dtype) and A (f32); write log r, weights (f32) and mask (u8)
    assert trajectory_ppo_bytes(torch.empty(10, 8)) == 10 * 8 * 4 + 8 * 4 + 8 * (4 + 4 + 1)
    assert trajectory_ppo_bytes(torch.empty(10, 8, dtype=torch.float64)) == 10 * 8 * 8 + 8 * 4 + 8 * (4 + 4 + 1)
