"""Noise schedules vs diffusers' DDPMScheduler (to 1e-6; skipped without diffusers) and vs float64 hand maths."""
import math

import numpy as np
import pytest
import torch

from ppo_ddpm.config import ScheduleConfig
from ppo_ddpm.ddpm.schedules import NoiseSchedule, make_betas

KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("T, beta_start, beta_end", [(1000, 1e-4, 0.02), (100, 1e-3, 0.05)])
def test_matches_diffusers_ddpm_scheduler(kind, T, beta_start, beta_end):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end, beta_schedule=KINDS[kind])
    s = NoiseSchedule(kind, T, beta_start, beta_end)
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float32 and s.betas.shape == (T,)
    torch.testing.assert_close(s.betas, ref.betas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.float(), atol=1e-6, rtol=0)


def test_float64_maths_by_hand():
    T = 1000
    lin = make_betas("linear", T, 1e-4, 0.02)
    assert lin.dtype == torch.float64
    np.testing.assert_allclose(lin.numpy(), 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1), rtol=0, atol=1e-15)

    scaled = make_betas("scaled_linear", T, 1e-4, 0.02)  # Stable Diffusion's: linear in sqrt(beta)
    root = math.sqrt(1e-4) + (math.sqrt(0.02) - math.sqrt(1e-4)) * np.arange(T) / (T - 1)
    np.testing.assert_allclose(scaled.numpy(), root**2, rtol=0, atol=1e-15)

    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    cos = make_betas("cosine", T)
    hand = np.array([min(1 - f((t + 1) / T) / f(t / T), 0.999) for t in range(T)])
    np.testing.assert_array_equal(cos.numpy(), hand)
    assert cos.max().item() == 0.999  # the cap is hit at the end

    # buffers are float64 cumprods rounded once, not float32 cumprods
    s = NoiseSchedule("linear", T)
    abar64 = np.cumprod(1 - lin.numpy())
    np.testing.assert_array_equal(s.alphas_cumprod.numpy(), abar64.astype(np.float32))


def test_from_config_and_q_sample():
    s = NoiseSchedule.from_config(ScheduleConfig(kind="cosine", num_train_timesteps=50))
    assert s.num_train_timesteps == 50
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 17, 49])
    xt = s.q_sample(x0, t, eps)
    for b in range(3):
        a = s.alphas_cumprod[t[b]].double()
        torch.testing.assert_close(xt[b].double(), a.sqrt() * x0[b].double() + (1 - a).sqrt() * eps[b].double(), atol=1e-6, rtol=0)


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="quadratic"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_target_by_hand(prediction_type):
    """epsilon -> noise, sample -> x_0, v_prediction -> sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    a = s.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    want = {"epsilon": noise, "sample": x0,
            "v_prediction": (a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()).float()}[prediction_type]
    torch.testing.assert_close(s.training_target(prediction_type, x0, t, noise), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="model.prediction_type"):
        s.training_target("x0", x0, t, noise)


def test_v_target_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    want = diffusers.DDPMScheduler(num_train_timesteps=1000).get_velocity(x0, noise, t)
    torch.testing.assert_close(s.training_target("v_prediction", x0, t, noise), want, atol=1e-6, rtol=0)
