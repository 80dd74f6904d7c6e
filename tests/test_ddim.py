"""DDIM timesteps and steps vs hand-derived values and diffusers' DDIMScheduler (those tests skip
without diffusers, the hand-maths ones always run); the step's log-prob vs float64 hand maths."""
import math

import pytest
import torch

from ppo_ddpm.ddpm.ddim import ddim_sigma, ddim_step_reference, ddim_timesteps, gaussian_log_prob, make_ddim_plan
from ppo_ddpm.ddpm.sample import ddim_sample
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


def _hand_log_prob64(x, mu, s):
    D = x[0].numel()
    sq = (x.double() - mu).pow(2).flatten(1).sum(1)
    return -sq / (2 * s**2) - D * math.log(s) - D / 2 * math.log(2 * math.pi)


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
    s = max(sig, sigma_floor)
    want = _hand_log_prob64(x_prev, mu64, s)
    assert lp.dtype == torch.float32 and lp.shape == (4,)
    torch.testing.assert_close(lp.double(), want, atol=1e-3, rtol=1e-5)
    _, _, lp_mean = ddim_step_reference(x_t, eps, a_t, a_p, sig, noise=noise, clip_x0=clip, sigma_floor=sigma_floor, reduction="mean")
    torch.testing.assert_close(lp_mean.double(), want / 48, atol=1e-5, rtol=1e-5)


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
    torch.testing.assert_close(lp2.double(), _hand_log_prob64(given, mean.double(), 0.2), atol=1e-3, rtol=1e-5)
    _, _, lp3 = ddim_step_reference(x_t, eps, 0.3, 0.5, 0.2, x_prev=sampled)  # re-scoring a sampled action
    torch.testing.assert_close(lp3, lp, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(gaussian_log_prob(given, mean, 0.2), lp2)


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
