"""DDIM timesteps, steps, plans (min_sigma, stochastic steps, from_config) and the DDIM loop vs hand-derived
values and diffusers' DDIMScheduler (those comparisons skip without diffusers, the hand-maths ones always
run); the step's float64 log-prob (of x_prev as stored) vs float64 hand maths."""
import math

import pytest
import torch
from torch import nn

from ppo_ddpm.config import Config
from ppo_ddpm.ddpm.ddim import (
    DDIMPlan, ddim_sigma, ddim_step_reference, ddim_timesteps, gaussian_log_prob, make_ddim_plan, squared_distance,
)
from ppo_ddpm.ddpm.sample import ddim_loop, ddim_sample
from ppo_ddpm.ddpm.schedules import NoiseSchedule
from ppo_ddpm.ddpm.unet import UNet

T = 1000


@pytest.fixture
def diffusers():
    """diffusers, for the comparisons only (skipped without it)."""
    return pytest.importorskip("diffusers")


def _scheduler(diffusers, spacing="leading", clip=False, set_alpha_to_one=True, kind="linear", prediction_type="epsilon",
               steps_offset=0):
    return diffusers.DDIMScheduler(
        num_train_timesteps=T, beta_schedule=kind, timestep_spacing=spacing, clip_sample=clip,
        clip_sample_range=1.0, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
        prediction_type=prediction_type,
    )


# by hand: leading t_i = i * (T // n), i = n-1..0; trailing t_i = round(T - i T / n) - 1, i = 0..n-1
HAND_TIMESTEPS = {
    ("leading", 1): [0],
    ("leading", 3): [666, 333, 0],  # T // 3 = 333
    ("leading", 7): [852, 710, 568, 426, 284, 142, 0],  # T // 7 = 142
    ("leading", 10): [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    ("trailing", 1): [999],
    ("trailing", 3): [999, 666, 332],  # 1000, 666.67, 333.33 rounded, minus 1
    ("trailing", 7): [999, 856, 713, 570, 428, 285, 142],  # 1000 - i 142.857..., rounded, minus 1
    ("trailing", 10): [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    ("linspace", 1): [0],
    ("linspace", 3): [999, 500, 0],  # 0, 499.5, 999 rounded half to even
    ("linspace", 10): [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],  # 999 / 9 = 111
}


@pytest.mark.parametrize("spacing, n", sorted(HAND_TIMESTEPS))
def test_timesteps_by_hand(spacing, n):
    ts = ddim_timesteps(n, T, spacing)
    assert ts.dtype == torch.int64 and ts.tolist() == HAND_TIMESTEPS[spacing, n]
    plan = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, n, 1.0, spacing, set_alpha_to_one=True)
    assert plan.prev_timesteps.tolist() == [t - T // n for t in HAND_TIMESTEPS[spacing, n]]


def test_steps_offset_by_hand():
    """diffusers' steps_offset shifts the leading timesteps only."""
    assert ddim_timesteps(10, T, "leading", 1).tolist() == [t + 1 for t in HAND_TIMESTEPS["leading", 10]]
    for spacing in ("trailing", "linspace"):
        assert ddim_timesteps(10, T, spacing, 1).tolist() == HAND_TIMESTEPS[spacing, 10]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [2, 50, 333, 999, 1000])
def test_timesteps_properties(spacing, n):
    ts = ddim_timesteps(n, T, spacing).tolist()
    assert len(ts) == n and ts == sorted(set(ts), reverse=True) and 0 <= ts[-1] and ts[0] <= T - 1
    assert ts[0] == (T - 1 if spacing == "trailing" else (n - 1) * (T // n))
    if spacing == "leading":
        assert ts[-1] == 0


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 333, 1000])
def test_timesteps_match_diffusers(diffusers, spacing, n):
    ref = _scheduler(diffusers, spacing)
    ref.set_timesteps(n)
    ts = ddim_timesteps(n, T, spacing)
    assert ts.dtype == torch.int64
    assert torch.equal(ts, ref.timesteps)


@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_linspace_spacing_and_steps_offset_match_diffusers(diffusers, n):
    for spacing, offset in (("linspace", 0), ("leading", 1), ("trailing", 1), ("linspace", 1)):
        ref = _scheduler(diffusers, spacing, steps_offset=offset)
        ref.set_timesteps(n)
        assert torch.equal(ddim_timesteps(n, T, spacing, offset), ref.timesteps), (spacing, offset)


def test_timesteps_bad_input():
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_timesteps(0, T)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, T, "middle")
    with pytest.raises(ValueError, match="sampling.steps_offset=1 puts DDIM timesteps"):
        ddim_timesteps(T, T, "leading", steps_offset=1)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_step_matches_diffusers(diffusers, spacing, clip, eta, set_alpha_to_one):
    n = 10
    ref = _scheduler(diffusers, spacing, clip, set_alpha_to_one)
    ref.set_timesteps(n)
    plan = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, n, eta, spacing, set_alpha_to_one)
    assert torch.equal(plan.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(plan.timesteps.tolist()):
        x_t = torch.randn(2, 3, 4, 4, generator=g)
        eps = torch.randn(2, 3, 4, 4, generator=g)
        noise = torch.randn(2, 3, 4, 4, generator=g)
        want = ref.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
        got, mean, _ = ddim_step_reference(
            x_t, eps, plan.abar_t[i], plan.abar_prev[i], plan.sigma[i], noise=noise, clip_x0=1.0 if clip else None
        )
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        if eta == 0:
            torch.testing.assert_close(mean, got, atol=0, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("offset", [0, 1])
def test_prediction_types_match_diffusers(diffusers, prediction_type, clip, eta, offset):
    """Each prediction type, clip on/off, eta 0/1, with steps_offset: our step == DDIMScheduler.step."""
    n = 10
    ref = _scheduler(diffusers, "leading", clip, prediction_type=prediction_type, steps_offset=offset)
    ref.set_timesteps(n)
    plan = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, n, eta, "leading", steps_offset=offset)
    assert torch.equal(plan.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(7)
    for i, t in enumerate(plan.timesteps.tolist()):
        x_t, out, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        want = ref.step(out, t, x_t, eta=eta, variance_noise=noise)
        got, mean, _ = ddim_step_reference(x_t, out, plan.abar_t[i], plan.abar_prev[i], plan.sigma[i], noise=noise,
                                           clip_x0=1.0 if clip else None, prediction_type=prediction_type)
        torch.testing.assert_close(got, want.prev_sample, atol=3e-5, rtol=1e-5)


def test_set_alpha_to_one_false_ends_at_abar_0():
    abar = NoiseSchedule("linear", T).alphas_cumprod
    on, off = (make_ddim_plan(abar, 10, 1.0, "trailing", s) for s in (True, False))  # last step t=99 -> -1
    assert on.abar_prev[-1].item() == 1.0 and on.sigma[-1].item() == 0.0
    assert off.abar_prev[-1].item() == abar[0].item() and off.sigma[-1].item() > 0
    assert torch.equal(on.abar_prev[:-1], off.abar_prev[:-1]) and torch.equal(on.prev_timesteps, off.prev_timesteps)


def test_sigma_formula_float64():
    a_t, a_p = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    want = 0.5 * math.sqrt((1 - 0.7) / (1 - 0.3)) * math.sqrt(1 - 0.3 / 0.7)
    assert abs(ddim_sigma(a_t, a_p, 0.5).item() - want) < 1e-15


def _hand_step64(x_t, eps, a_t, a_p, sig, clip):
    x_t, eps = x_t.double(), eps.double()
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sig**2) * eps


def f32(v: float) -> float:
    """v rounded to float32 (the policy's std s = max(sigma, sigma_floor) is a float32 value)."""
    return torch.tensor(v, dtype=torch.float32).item()


def _hand_log_prob64(x, mu, s):
    """log N(x; mu, s^2 I) per sample, every residual and the sum exact-rounded in float64 (math.fsum)."""
    D = x[0].numel()
    out = []
    for xb, mb in zip(x.double().flatten(1).tolist(), mu.double().flatten(1).tolist()):
        sq = math.fsum((a - b) ** 2 for a, b in zip(xb, mb))
        out.append(-sq / (2 * s**2) - D * math.log(s) - D / 2 * math.log(2 * math.pi))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("sigma_floor", [0.0, 0.05])
def test_log_prob_matches_float64_hand_computation(clip, sigma_floor):
    g = torch.Generator().manual_seed(1)
    x_t, eps, noise = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    a_t, a_p = 0.4, 0.6
    sig = ddim_sigma(torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_p, dtype=torch.float64), 1.0).item()
    x_prev, mean, lp = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=noise, clip_x0=clip, sigma_floor=sigma_floor)
    mu64 = _hand_step64(x_t, eps, a_t, a_p, sig, clip)
    torch.testing.assert_close(mean.double(), mu64, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_prev.double(), mu64 + sig * noise.double(), atol=1e-5, rtol=0)
    s = max(f32(sig), f32(sigma_floor))
    assert lp.dtype == torch.float64 and lp.shape == (4,)
    # exact for the float32 values it scores (the returned x_prev and mean)
    torch.testing.assert_close(lp, _hand_log_prob64(x_prev, mean, s), atol=0, rtol=1e-13)
    # and close to the float64 step (the float32 mean differs from mu64 by ~1e-7 per pixel)
    want = _hand_log_prob64(x_prev, mu64, s)
    torch.testing.assert_close(lp, want, atol=1e-3, rtol=1e-5)
    _, _, lp_mean = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=noise, clip_x0=clip, sigma_floor=sigma_floor, reduction="mean")
    assert lp_mean.dtype == torch.float64
    torch.testing.assert_close(lp_mean, _hand_log_prob64(x_prev, mean, s) / 48, atol=0, rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gaussian_log_prob_is_float64_exact(dtype):
    """3x32x32 at s = 0.01 (log-probs ~1e4): the float64 residual sum keeps ~1e-12 relative accuracy, so the
    difference of two log-probs of the same action (a PPO log-ratio) is exact to ~1e-8."""
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64).to(dtype)
    x = (mu.double() + 0.01 * torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)).to(dtype)
    s = torch.tensor([0.01, 0.02, 0.5])
    lp = gaussian_log_prob(x, mu, s)
    assert lp.dtype == torch.float64 and lp.shape == (3,)
    want = torch.cat([_hand_log_prob64(x[b:b + 1], mu[b:b + 1], s[b].item()) for b in range(3)])
    torch.testing.assert_close(lp, want, atol=1e-9, rtol=1e-14)
    sq = squared_distance(x, mu)
    assert sq.dtype == torch.float64
    exact_sq = [math.fsum((a - b) ** 2 for a, b in zip(xb, mb)) for xb, mb in zip(x.double().flatten(1).tolist(), mu.double().flatten(1).tolist())]
    torch.testing.assert_close(sq, torch.tensor(exact_sq, dtype=torch.float64), atol=0, rtol=1e-14)
    torch.testing.assert_close(gaussian_log_prob(x, mu, s, reduction="mean"), want / 3072, atol=1e-12, rtol=1e-14)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mu, s, reduction="max")


def test_out_buffer_receives_x_prev_and_the_log_prob_scores_it_as_stored():
    """fp32 network, bf16 buffer (a rollout-cache state): x_prev = bf16(mu + sigma z) (round to nearest even,
    torch's cast), written into ``out``; the log-prob is that of the bf16 value."""
    g = torch.Generator().manual_seed(5)
    x_t, eps, noise = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    a_t, a_p, sig, floor = 0.3, 0.5, 0.4, 0.05
    out = torch.full((3, 3, 8, 8), float("nan"), dtype=torch.bfloat16)
    x_prev, mean, lp = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=noise, sigma_floor=floor, out=out)
    assert x_prev is out and x_prev.dtype == torch.bfloat16 and mean.dtype == torch.float32
    x32, mean_free, lp_free = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=noise, sigma_floor=floor)
    assert torch.equal(mean, mean_free) and torch.equal(out, x32.to(torch.bfloat16))
    assert not torch.equal(out.float(), x32)  # the rounding is real ...
    torch.testing.assert_close(lp, _hand_log_prob64(out, mean, f32(sig)), atol=0, rtol=1e-13)
    assert (lp - lp_free).abs().min() > 1e-3  # ... and the log-prob sees it
    # re-scoring the stored action gives the same log-prob, bit for bit (log r = 0 at unchanged params)
    _, _, lp_again = ddim_step_reference(x_t, eps, a_t, a_p, sig, x_prev=out, sigma_floor=floor)
    assert torch.equal(lp_again, lp)
    with pytest.raises(ValueError, match="out"):
        ddim_step_reference(x_t, eps, a_t, a_p, sig, x_prev=x32, out=out)


def test_low_precision_x_prev_is_scored_as_returned():
    """Without ``out``, x_prev comes back in x_t's dtype (bf16 here) and the log-prob scores that value,
    not the float32 value before rounding."""
    g = torch.Generator().manual_seed(6)
    x_t, eps, noise = (torch.randn(2, 3, 8, 8, generator=g).bfloat16() for _ in range(3))
    x_prev, mean, lp = ddim_step_reference(x_t, eps, 0.3, 0.5, 0.4, noise=noise)
    assert x_prev.dtype == mean.dtype == torch.bfloat16 and lp.dtype == torch.float64
    # the float32 mean before its bf16 rounding, by hand
    x0 = (x_t.float() - f32(math.sqrt(0.7)) * eps.float()) / f32(math.sqrt(0.3))
    mean32 = f32(math.sqrt(0.5)) * x0 + f32(math.sqrt(1 - 0.5 - f32(0.4) ** 2)) * eps.float()
    unrounded = mean32 + f32(0.4) * noise.float()
    assert torch.equal(x_prev, unrounded.bfloat16())
    torch.testing.assert_close(lp, _hand_log_prob64(x_prev, mean32, f32(0.4)), atol=0, rtol=1e-13)
    assert (lp - _hand_log_prob64(unrounded, mean32, f32(0.4))).abs().min() > 1e-3  # the unrounded value's differs
    _, _, lp_again = ddim_step_reference(x_t, eps, 0.3, 0.5, 0.4, x_prev=x_prev)
    assert torch.equal(lp_again, lp)


def test_per_sample_abar_and_sigma():
    """[B] abar/sigma give each sample its own step, as running the samples one by one."""
    g = torch.Generator().manual_seed(2)
    x_t, eps, noise = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    a_t, a_p = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.6, 0.95])
    sig = ddim_sigma(a_t, a_p, 1.0)
    x_prev, mean, lp = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=noise)
    for b in range(3):
        xb, mb, lb = ddim_step_reference(x_t[b:b + 1], eps[b:b + 1], a_t[b], a_p[b], sig[b], noise=noise[b:b + 1])
        torch.testing.assert_close(x_prev[b:b + 1], xb)
        torch.testing.assert_close(mean[b:b + 1], mb)
        torch.testing.assert_close(lp[b:b + 1], lb)


def test_scoring_a_given_x_prev():
    g = torch.Generator().manual_seed(3)
    x_t, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    sampled, mean, lp = ddim_step_reference(x_t, eps, 0.3, 0.5, 0.2, noise=noise)
    given = torch.randn(2, 3, 4, 4, generator=g)
    x_prev, mean2, lp2 = ddim_step_reference(x_t, eps, 0.3, 0.5, 0.2, x_prev=given)
    assert torch.equal(x_prev, given) and torch.equal(mean2, mean)
    torch.testing.assert_close(lp2, _hand_log_prob64(given, mean, f32(0.2)), atol=0, rtol=1e-13)
    _, _, lp3 = ddim_step_reference(x_t, eps, 0.3, 0.5, 0.2, x_prev=sampled)  # re-scoring a sampled action
    assert torch.equal(lp3, lp)
    assert torch.equal(gaussian_log_prob(given, mean, torch.tensor(0.2)), lp2)


def test_step_bad_input():
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="either noise or x_prev"):
        ddim_step_reference(x, x, 0.5, 0.6, 0.1, noise=x, x_prev=x)
    with pytest.raises(ValueError, match="reduction"):
        ddim_step_reference(x, x, 0.5, 0.6, 0.1, reduction="max")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_equals_diffusers_loop(diffusers, eta):
    """ddim_sample == the diffusers DDIM loop with the same model and the same noise draws."""
    torch.manual_seed(0)
    model = UNet(sample_size=8, base_channels=8, channel_mults=[1, 2], attention_resolutions=[4])
    n = 5
    plan = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, n, eta, "trailing")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    model.train()
    got = ddim_sample(model, plan, x_T, clip_x0=1.0, generator=torch.Generator().manual_seed(5))
    assert model.training  # mode restored

    ref = _scheduler(diffusers, "trailing", clip=True)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(5)
    x = x_T
    with torch.no_grad():
        for t in ref.timesteps.tolist():
            eps = model(x, torch.full((2,), t))
            noise = torch.randn(x.shape, generator=g)
            x = ref.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def _variance64(plan_f64_abar_t, plan_f64_abar_prev):
    a_t, a_p = plan_f64_abar_t, plan_f64_abar_prev
    return (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)


@pytest.mark.parametrize("spacing,set_alpha_to_one", [("leading", True), ("trailing", False)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_min_sigma_raises_every_sigma_and_the_mean_follows(diffusers, spacing, set_alpha_to_one, eta):
    """sigma_i = max(eta sqrt(var_i), m) (float64 maths); the DDIM mean of that sigma equals diffusers' step
    with the eta that gives it (eta_i = sigma_i / sqrt(var_i)), and sqrt(max(1 - abar_prev - sigma^2, 0))
    where 1 - abar_prev < sigma^2 (diffusers would give NaN there)."""
    n, m = 10, 0.05
    ac = NoiseSchedule("linear", T).alphas_cumprod
    plan = make_ddim_plan(ac, n, eta, spacing, set_alpha_to_one, min_sigma=m)
    base = make_ddim_plan(ac, n, eta, spacing, set_alpha_to_one)
    assert torch.equal(plan.timesteps, base.timesteps) and torch.equal(plan.abar_prev, base.abar_prev)
    ac64 = ac.double()
    a_t = ac64[plan.timesteps]
    a_p = torch.where(plan.prev_timesteps >= 0, ac64[plan.prev_timesteps.clamp_min(0)],
                      torch.tensor(1.0 if set_alpha_to_one else ac64[0].item(), dtype=torch.float64))
    var = _variance64(a_t, a_p).clamp_min(0)
    want = (eta * var.sqrt()).clamp_min(m)
    torch.testing.assert_close(plan.sigma.double(), want, rtol=1e-6, atol=0)
    assert plan.stochastic_steps() == list(range(n))
    assert base.stochastic_steps() == ([] if eta == 0 else [i for i in range(n) if var[i] > 0])

    ref = _scheduler(diffusers, spacing, set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(7)
    checked = 0
    for i, t in enumerate(plan.timesteps.tolist()):
        x_t, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        got, mean, _ = ddim_step_reference(x_t, eps, plan.abar_t[i], plan.abar_prev[i], plan.sigma[i], noise=noise)
        sig = plan.sigma[i].double().item()
        coef = math.sqrt(max(1 - a_p[i].item() - sig**2, 0.0))
        hand = math.sqrt(a_p[i].item()) * (x_t.double() - math.sqrt(1 - a_t[i].item()) * eps.double()) / math.sqrt(a_t[i].item()) + coef * eps.double()
        torch.testing.assert_close(mean.double(), hand, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got.double(), hand + sig * noise.double(), atol=2e-5, rtol=1e-5)
        if var[i] > 0 and 1 - a_p[i].item() - sig**2 > 0:
            want_d = ref.step(eps, t, x_t, eta=sig / math.sqrt(var[i].item()), variance_noise=noise).prev_sample
            torch.testing.assert_close(got, want_d, atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked >= n - 2  # all but the steps into abar_prev ~ 1 (checked by hand above)


def test_stochastic_steps_of_a_plan():
    """set_alpha_to_one with leading spacing: the last step (abar_prev = 1) has sigma = 0 whatever eta,
    a deterministic step (the environment's); eta = 0: every step is."""
    ac = NoiseSchedule("linear", T).alphas_cumprod
    plan = make_ddim_plan(ac, 5, 1.0, "leading", True)
    assert plan.sigma[-1].item() == 0.0 and (plan.sigma[:-1] > 0).all()
    assert plan.stochastic_steps() == [0, 1, 2, 3]
    assert make_ddim_plan(ac, 5, 0.0, "leading", True).stochastic_steps() == []
    assert make_ddim_plan(ac, 5, 1.0, "trailing", False).stochastic_steps() == [0, 1, 2, 3, 4]
    assert make_ddim_plan(ac, 5, 0.0, "leading", True, min_sigma=1e-3).stochastic_steps() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("sample_at_floor", [False, True])
def test_plan_from_config(diffusers, sample_at_floor):
    """DDIMPlan.from_config: the schedule and sampling of the config (timesteps and abar as diffusers'), with
    ppo.sample_at_floor the sigmas raised to float32(ppo.sigma_floor) (eta = 0: exactly the floor)."""
    cfg = Config()
    cfg.sampling.num_inference_steps, cfg.sampling.eta, cfg.sampling.spacing = 7, 0.0, "trailing"
    cfg.ppo.sigma_floor, cfg.ppo.sample_at_floor = 0.03, sample_at_floor
    plan = DDIMPlan.from_config(cfg)
    ref = _scheduler(diffusers, "trailing")
    ref.set_timesteps(7)
    assert torch.equal(plan.timesteps, ref.timesteps)
    torch.testing.assert_close(plan.abar_t.double(), ref.alphas_cumprod[ref.timesteps].double(), rtol=1e-6, atol=0)
    if sample_at_floor:
        assert plan.sigma.tolist() == [f32(0.03)] * 7 and plan.stochastic_steps() == list(range(7))
    else:
        assert plan.sigma.tolist() == [0.0] * 7 and plan.stochastic_steps() == []
    cfg.sampling.eta = 1.0  # the DDIM sigmas, raised to the floor where below it
    ddim = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, 7, 1.0, "trailing", True).sigma
    want = ddim.clamp_min(f32(0.03)) if sample_at_floor else ddim
    assert torch.equal(DDIMPlan.from_config(cfg).sigma, want)


class _Affine(nn.Module):
    """eps = a x + b t / 1000 [+ c y]: a model whose every output is easy to recompute by hand."""

    def forward(self, x, t, y=None):
        out = 0.3 * x + (t.to(x.dtype) / 1000).view(-1, *[1] * (x.dim() - 1))
        return out if y is None else out + 0.1 * y.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def test_ddim_loop_stores_continues_from_and_scores_the_stored_states(diffusers):
    """``store(i)`` buffers in bf16 (a rollout cache): state i+1 = bf16(x_{i+1}), the next step starts from the
    stored value, and ``visit`` gets each step's (x_i, x_{i+1}, mu_i, log_prob_i) with log_prob_i that of
    the stored action. Reference: diffusers' DDIM step on the same model and noise, rounded to bf16."""
    n, B = 4, 3
    plan = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, n, 1.0, "trailing", False)
    x_T = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 2, 1])
    zs = torch.randn(n, B, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    states = torch.full((n + 1, B, 2, 4, 4), float("nan"), dtype=torch.bfloat16)
    visits = []
    x0 = ddim_loop(_Affine(), plan, x_T, labels, noise=zs.__getitem__, clip_x0=None, sigma_floor=0.02,
                   store=states.__getitem__, visit=lambda *a: visits.append([v.clone() if torch.is_tensor(v) else v for v in a]))
    assert [v[0] for v in visits] == list(range(n)) and torch.isnan(states[0].float()).all()
    assert x0.dtype == torch.float32 and torch.equal(x0, states[n].float())

    ref = _scheduler(diffusers, "trailing", set_alpha_to_one=False)
    ref.set_timesteps(n)
    x = x_T
    for i, t in enumerate(ref.timesteps.tolist()):
        _, x_i, x_next, mu, lp = visits[i]
        assert torch.equal(x_i, x)  # step i started from the stored state (x_T for i = 0)
        eps = _Affine()(x, torch.full((B,), t), labels)
        want = ref.step(eps, t, x, eta=1.0, variance_noise=zs[i]).prev_sample
        assert x_next.dtype == torch.bfloat16 and torch.equal(x_next, states[i + 1])
        torch.testing.assert_close(x_next.float(), want.bfloat16().float(), atol=1e-2, rtol=0)  # one bf16 ulp at most
        s = max(plan.sigma[i].item(), f32(0.02))
        torch.testing.assert_close(lp, _hand_log_prob64(x_next, mu, s), atol=0, rtol=1e-13)
        x = states[i + 1].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_sample_draws_noise_in_the_dtype_of_x_T(diffusers, dtype):
    """ddim_sample = ddim_loop with z_i ~ randn(generator, dtype=x_T.dtype): a float64 loop is float64 throughout."""
    n = 3
    plan = make_ddim_plan(NoiseSchedule("linear", T).alphas_cumprod, n, 1.0, "trailing", False)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = ddim_sample(_Affine(), plan, x_T, generator=torch.Generator().manual_seed(2))
    assert got.dtype == dtype
    ref = _scheduler(diffusers, "trailing", set_alpha_to_one=False)
    ref.set_timesteps(n)
    g, x = torch.Generator().manual_seed(2), x_T
    for t in ref.timesteps.tolist():
        z = torch.randn(x.shape, generator=g, dtype=dtype)
        x = ref.step(_Affine()(x, torch.full((2,), t)), t, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(got, x, atol=1e-12 if dtype == torch.float64 else 2e-5, rtol=1e-5)
