"""Distance-to-data checks (``ppo_ddpm.quality``), the random-reward control, the bounded real-vs-fake
reward and eval's verdict, each against hand-derived values."""
from __future__ import annotations

import math

import pytest
import torch

from ppo_ddpm.eval import verdict
from ppo_ddpm.quality import RandomFeatures, image_stats, kid, kid_from_features, mean_pairwise_distance
from ppo_ddpm.reward import RewardCNN, random_reward, real_vs_fake_log_odds, real_vs_fake_log_p_real


def _mmd2_by_loops(a, b):
    """Unbiased MMD^2 of k(u, v) = (u.v / d + 1)^3, written with explicit sums over pairs."""
    d = len(a[0])
    k = lambda u, v: (sum(x * y for x, y in zip(u, v)) / d + 1) ** 3  # noqa: E731
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(u, v) for u in a for v in b) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_cubic_mmd():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g) + 0.5
    assert kid_from_features(fa, fb) == pytest.approx(_mmd2_by_loops(fa.tolist(), fb.tolist()), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        kid_from_features(fa[:1], fb)


def test_kid_grows_with_a_distribution_shift_and_is_near_zero_without_one():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(64, 3, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    features = RandomFeatures()
    same = kid(a, b, features)
    shifted = kid(a, (b * 0.3 + 0.5).clamp(-1, 1), features)
    assert abs(same) < 0.2 * shifted and shifted > 0


def test_random_features_are_fixed_by_the_seed():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.equal(RandomFeatures(7)(x), RandomFeatures(7)(x))
    assert not torch.equal(RandomFeatures(7)(x), RandomFeatures(8)(x))
    assert RandomFeatures()(x).shape == (3, 2 * (32 + 64 + 128))


def test_image_stats_by_hand():
    flat = torch.zeros(2, 3, 6, 6)
    flat[:, 0] = 0.5  # red 0.5, green and blue 0
    flat[1] = -flat[1]
    s = image_stats(flat)
    assert s["grain"] == 0.0
    assert s["mean_r"] == pytest.approx(0.0) and s["mean_g"] == 0.0
    assert s["saturation"] == pytest.approx(0.5)  # max - min over RGB is 0.5 at every pixel of both images
    assert s["diversity"] == pytest.approx(math.sqrt(36 * 1.0 ** 2))  # images differ by 1.0 in 36 red pixels
    edge = torch.zeros(1, 3, 9, 9)
    edge[..., 4:] = 1.0  # one vertical edge: the Laplacian is non-zero on 2 of 7 interior columns
    assert image_stats(edge)["grain"] == 0.0  # the median ignores the edge
    noise = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(0)) * 0.1
    assert image_stats(noise)["grain"] > 0.1  # |Laplacian| of white noise with std 0.1: about 0.3 at the median


def test_mean_pairwise_distance_by_hand():
    x = torch.tensor([[[[0.0]]], [[[3.0]]], [[[4.0]]]]).expand(3, 3, 1, 1)
    pairs = [math.sqrt(3) * d for d in (3.0, 4.0, 1.0)]
    assert mean_pairwise_distance(x) == pytest.approx(sum(pairs) / 3)
    assert mean_pairwise_distance(x[:1]) == 0.0


def test_random_reward_is_a_deterministic_function_of_the_image_and_standard_normal():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 3, 4, 4, generator=g) * 2 - 1
    r = random_reward(x)
    assert torch.equal(r, random_reward(x.clone()))
    assert torch.equal(random_reward(x[:10]), r[:10])  # per image, not per batch position
    assert abs(float(r.mean())) < 4 / math.sqrt(400) and abs(float(r.std()) - 1) < 0.15
    brighter = random_reward((x + 0.05).clamp(-1, 1))
    assert abs(float(torch.corrcoef(torch.stack([r, brighter]))[0, 1])) < 0.2  # carries no information


def test_log_p_real_is_the_log_sigmoid_of_the_log_odds():
    model = RewardCNN(hidden_channels=4, image_size=8).eval()
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        logits = model(x).double()
        odds = real_vs_fake_log_odds(model, 1, 0)(x)
        log_p = real_vs_fake_log_p_real(model, 1, 0)(x)
    expected = torch.log_softmax(logits, dim=1)[:, 1]
    torch.testing.assert_close(odds.double(), logits[:, 1] - logits[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_p.double(), expected, rtol=1e-6, atol=1e-6)
    assert bool((log_p <= 0).all())


def _summary(gain=1.0, se=0.1, div=(10.0, 10.0), kid=(0.04, 0.03), grain=(0.1, 0.08, 0.01), control=None):
    r = {"reward_gain": gain, "reward_gain_se": se, "base_diversity": div[0], "finetuned_diversity": div[1],
         "base": {"kid": kid[0], "grain": grain[0]}, "finetuned": {"kid": kid[1], "grain": grain[1]},
         "real": {"grain": grain[2]}}
    if control is not None:
        r.update(gain_over_control=control[0], gain_over_control_se=control[1])
    return r


@pytest.mark.parametrize("kwargs, label", [
    ({}, "improved"),
    ({"control": (0.8, 0.1)}, "improved"),
    ({"control": (0.15, 0.1)}, "no gain over control"),
    ({"gain": 0.15}, "no gain"),
    ({"div": (10.0, 7.9)}, "collapsed"),
    ({"kid": (0.04, 0.051)}, "off-data"),
    ({"grain": (0.1, 0.126, 0.01)}, "off-data"),
    ({"grain": (0.01, 0.2, 0.3)}, "improved"),  # grainier than the base, but not than the real data
    ({"div": (10.0, 7.0), "gain": 0.0}, "collapsed"),  # the first label wins; both reasons are listed
])
def test_verdict(kwargs, label):
    got, reasons = verdict(_summary(**kwargs))
    assert got == label
    assert (got == "improved") == (not reasons)
    if kwargs.get("div") == (10.0, 7.0):
        assert [x.split(":")[0] for x in reasons] == ["collapsed", "no gain"]


def test_verdict_without_real_data_skips_the_distance_checks():
    r = _summary(kid=(0.01, 1.0))
    del r["real"]
    assert verdict(r) == ("improved", [])


def test_verdict_of_a_non_finite_model():
    """Unknown values (None: not finite) skip their comparison; an unknown gain is no gain; NaN / inf
    rewards or samples of the fine-tuned model come first."""
    r = _summary(gain=None, div=(10.0, None), kid=(0.04, None), grain=(0.1, None, 0.01), control=(None, None))
    r.update(num_samples=8, finetuned_nonfinite_rewards=8, finetuned_nonfinite_images=8)
    label, reasons = verdict(r)
    assert label == "non-finite"
    assert [x.split(":")[0] for x in reasons] == ["non-finite", "no gain", "no gain over control"]
    assert "cannot be measured" in reasons[1]
    r = _summary(se=None)  # fewer than two finite pairs: the gain's significance is unknown
    assert verdict(r)[0] == "no gain"


def test_kid_and_stats_reject_bad_shapes():
    for bad in (torch.zeros(2, 1, 4, 4), torch.zeros(3, 4, 4), torch.zeros(0, 3, 4, 4)):
        with pytest.raises(ValueError, match=r"\[N, 3, S, S\]"):
            image_stats(bad)
    assert all(isinstance(v, float) for v in image_stats(torch.zeros(2, 3, 4, 4)).values())
