"""The DDPM UNet: shapes, time and class conditioning, per-sample timesteps, float64, config errors."""
import math

import pytest
import torch

from ppo_ddpm.config import ModelConfig
from ppo_ddpm.ddpm.unet import UNet, timestep_embedding

TINY = dict(sample_size=8, base_channels=8, channel_mults=[1, 2], attention_resolutions=[4])


def _inputs(B=3, C=3, S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g), torch.tensor([0, 500, 999, 250, 17, 3][:B])


@pytest.mark.parametrize(
    "kw",
    [
        dict(TINY),
        dict(TINY, in_channels=1),
        dict(sample_size=8, base_channels=8, channel_mults=[1, 2, 2], num_res_blocks=2, attention_resolutions=[8, 2]),
        dict(sample_size=8, base_channels=12, channel_mults=[1], attention_resolutions=[]),
    ],
)
def test_output_shape_and_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(0)
    model = UNet(**kw)
    x, t = _inputs(C=kw.get("in_channels", 3))
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_from_config_matches_constructor():
    cfg = ModelConfig(**TINY, num_classes=2, dropout=0.1)
    torch.manual_seed(0)
    a = UNet.from_config(cfg)
    torch.manual_seed(0)
    b = UNet(**TINY, num_classes=2, dropout=0.1)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.sample_size == 8 and a.in_channels == 3 and a.num_classes == 2


def test_deterministic_on_cpu():
    """Eval mode switches dropout off (the output is that of the same weights without dropout, call after
    call); train mode draws a dropout mask from the torch RNG (calls differ, a reseed repeats them)."""
    torch.manual_seed(0)
    model = UNet(**TINY, dropout=0.3)
    plain = UNet(**TINY, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    x, t = _inputs()
    model.eval()
    out = model(x, t)
    assert torch.equal(out, model(x, t)) and torch.equal(out, plain.eval()(x, t))
    model.train()
    torch.manual_seed(1)
    a, b = model(x, t), model(x, t)
    torch.manual_seed(1)
    assert not torch.allclose(a, b) and not torch.allclose(a, out) and torch.equal(a, model(x, t))


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 123.5], dtype=torch.float64)
    emb = timestep_embedding(t, 6, torch.float64)
    for b, tv in enumerate(t.tolist()):
        w = [10000 ** (-k / 3) for k in range(3)]
        want = [math.cos(tv * wk) for wk in w] + [math.sin(tv * wk) for wk in w]
        torch.testing.assert_close(emb[b], torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    assert timestep_embedding(t, 7, torch.float64).shape == (3, 7)


def test_time_conditioning_int_float_and_scalar_t():
    torch.manual_seed(0)
    model = UNet(**TINY)
    x, _ = _inputs()
    t = torch.tensor([10, 10, 10])
    out = model(x, t)
    assert torch.equal(out, model(x, t.float()))
    assert torch.equal(out, model(x, torch.tensor(10)))
    assert not torch.allclose(out, model(x, t + 400))


def test_per_sample_timesteps_equal_separate_runs_float64():
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=3).double()
    x, t = _inputs(B=4)
    x = x.double()
    y = torch.tensor([0, 2, 1, 2])
    out = model(x, t, y)
    assert out.dtype == torch.float64
    for b in range(4):
        torch.testing.assert_close(out[b:b + 1], model(x[b:b + 1], t[b:b + 1], y[b:b + 1]), atol=1e-12, rtol=0)


def test_float64_agrees_with_float32():
    torch.manual_seed(0)
    m32 = UNet(**TINY)
    m64 = UNet(**TINY).double()
    m64.load_state_dict(m32.state_dict())
    x, t = _inputs()
    torch.testing.assert_close(m64(x.double(), t).float(), m32(x, t), atol=1e-4, rtol=1e-4)


def test_class_conditioning_changes_output():
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=3)
    x, t = _inputs()
    a = model(x, t, torch.tensor([0, 0, 0]))
    b = model(x, t, torch.tensor([1, 2, 0]))
    assert not torch.allclose(a[:2], b[:2]) and torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**TINY)(x, t, torch.tensor([0, 0, 0]))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(TINY, attention_resolutions=[16]), "model.attention_resolutions"),
        (dict(TINY, sample_size=6, channel_mults=[1, 2, 2]), "model.sample_size"),
        (dict(TINY, channel_mults=[]), "model.channel_mults"),
    ],
)
def test_bad_sizes_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kw)


def test_bad_input_shapes():
    model = UNet(**TINY)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 7, 7), torch.zeros(1))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(3))
