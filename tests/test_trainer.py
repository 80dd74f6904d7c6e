"""PPOTrainer behaviour: exact ratio 1 at old params, ratio-pass skip, step-independent peak memory,
NaN rewards / gradients skipped and counted, the policy steps (deterministic steps are the environment's;
an all-deterministic sampler is an error), the update's trust-region diagnostics, reward rising on a short run."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch

from ppo_ddpm.config import ConfigError
from ppo_ddpm.ddpm.ddim import ddim_step_reference
from ppo_ddpm.ppo import PPOTrainer, RolloutNoise, derive_seed
from ppo_ddpm.ppo.objective import RATIO_STATS
from ppo_ddpm.ppo.rollout import check_policy_steps
from test_trainer_grad import TinyEps, brightness, f32, grads, reference_terms, tiny_config


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def trained(trainer) -> torch.Tensor:
    return torch.tensor(trainer.trained_steps)


@pytest.mark.parametrize("objective", ["trajectory", "per_step"])
@pytest.mark.parametrize("state_dtype,use_kernels", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_ratio_exactly_one_at_old_params(state_dtype, use_kernels, objective):
    """use_kernels: the fused Triton ops (in the CPU interpreter here) on a smaller batch. The rollout scores
    each action as stored (bf16 included), so the ratio pass gives log r = 0 exactly; on the reference path
    the with-grad pass's per-step log-ratios (per_step objective) are exactly 0 too."""
    torch.manual_seed(0)
    cfg = tiny_config(True, state_dtype=state_dtype, use_kernels=use_kernels, kl_beta=0.1, objective=objective)
    if use_kernels:
        cfg.ppo.batch_size = cfg.ppo.microbatch = 4
        cfg.sampling.num_inference_steps = 3
    trainer = PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    B = cfg.ppo.batch_size
    cache, _ = trainer.rollout(seed=3)
    if state_dtype == "bfloat16":
        assert cache.states.dtype == torch.bfloat16
    assert cache.log_probs.dtype == torch.float64
    # state 0 is not cached: every pass reads x_T as drawn (unrounded), here compared with a redraw from the seed
    x_T = RolloutNoise.draw(3, B, trainer.n, trainer.sample_shape, 0, "cpu", torch.float32).x_T
    assert cache.states.shape[0] == trainer.n and torch.equal(trainer.state(0), x_T)
    assert not torch.equal(x_T, x_T.bfloat16().float())
    rows, steps = torch.arange(B), cache.timestep_plan(1, trainer.steps_per_sample, trained(trainer))
    skipped = trainer.ratio_pass(rows)
    assert skipped.dtype == torch.float64 and bool((skipped == 0).all())
    g_skip = (trainer.minibatch_gradient(rows, steps), grads(trainer.policy))
    trainer.params_changed()  # same params, but the ratio pass now runs
    run = trainer.ratio_pass(rows)
    assert run.shape == (trainer.n_train, B) and run.dtype == torch.float64
    assert bool((run == 0).all()), run  # log r == 0 exactly: the rollout scored the stored action alike
    g_run = (trainer.minibatch_gradient(rows, steps), grads(trainer.policy))
    assert torch.equal(g_skip[1], g_run[1])
    stats = g_run[0]
    assert float(stats["approx_kl"]) == 0.0 and float(stats["clipfrac"]) == 0.0 and float(stats["keep_frac"]) == 1.0
    assert float(stats["log_ratio_raw_abs_max"]) <= (1e-9 if use_kernels else 0.0)


class _Box:
    def __init__(self, t):
        self.t = t


class SavedBytes:
    """saved_tensors_hooks that track the bytes autograd keeps alive for backward (and their peak)."""

    def __init__(self):
        self.live = self.peak = 0

    def _release(self, n):
        self.live -= n

    def pack(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        box = _Box(t)
        weakref.finalize(box, self._release, n)
        return box

    def unpack(self, box):
        return box.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def peak_saved_bytes(num_steps: int, full_graph: bool) -> int:
    torch.manual_seed(0)
    cfg = tiny_config(kl_beta=0.1)
    cfg.sampling.num_inference_steps = num_steps
    trainer = PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    cache, _ = trainer.rollout(seed=0)
    trainer.params_changed()
    rows = torch.arange(8)
    meter = SavedBytes()
    with meter.hooks():
        if full_graph:  # naive reference: every step's graph alive at once
            l, kl, _ = reference_terms(trainer, trainer.policy, trainer.policy, trainer.ref_policy, trainer.trained_steps)
            (l.sum() + kl.sum()).backward()
        else:
            trainer.minibatch_gradient(rows, cache.timestep_plan(0, trainer.steps_per_sample, trained(trainer)))
    assert meter.live == 0
    return meter.peak


def test_peak_memory_independent_of_num_steps():
    short, long = peak_saved_bytes(2, False), peak_saved_bytes(6, False)
    assert short > 0 and long == short
    # the meter does see growth when all steps are differentiated at once
    assert peak_saved_bytes(6, True) > 2.5 * peak_saved_bytes(2, True)


def test_seeded_rollout_draws_step_noise_in_place_and_equals_explicit_noise():
    """rollout(seed) draws z_i step by step into one buffer; RolloutNoise.draw(seed) reproduces it
    exactly, and both equal a plain DDIM loop over that noise."""
    torch.manual_seed(0)
    cfg = tiny_config()
    trainer = PPOTrainer(cfg, TinyEps().double(), brightness, "cpu")
    B, n = cfg.ppo.batch_size, trainer.n
    cache, _ = trainer.rollout(seed=5)
    seeded = cache.states.clone(), cache.log_probs.clone()
    assert trainer._z.shape == (B, *trainer.sample_shape)  # one step's noise, not [n, B, ...]
    noise = RolloutNoise.draw(5, B, n, trainer.sample_shape, 0, "cpu", torch.float64)
    cache, _ = trainer.rollout(seed=0, noise=noise)
    assert torch.equal(cache.states, seeded[0]) and torch.equal(cache.log_probs, seeded[1])
    x, plan = noise.x_T, trainer.plan
    for i in range(n):
        coefs = (plan.abar_t[i], plan.abar_prev[i], plan.sigma[i])
        x, _, _ = ddim_step_reference(x, trainer.policy(x, plan.timesteps[i].expand(B)), *coefs, noise=noise.z[i],
                                      clip_x0=cfg.sampling.clip_x0)
        torch.testing.assert_close(cache.state(i + 1).double(), x, rtol=0, atol=1e-6)


def test_nan_reward_batch_skipped_and_counted():
    torch.manual_seed(0)

    def bad(x0, labels=None):
        r = x0.mean((1, 2, 3))
        r[2] = float("nan")
        return r

    trainer = PPOTrainer(tiny_config(), TinyEps(), bad, "cpu")
    before = params(trainer.policy)
    stats = trainer.step(0)
    assert stats["skipped"] == 1.0 and stats["skipped_batches"] == 1.0 and stats["nonfinite_rewards"] == 1.0
    assert torch.equal(before, params(trainer.policy))
    assert trainer._rollout_version is None  # the cache holds no valid rollout
    with pytest.raises(ValueError, match="NaN/inf"):
        trainer.update(trainer.cache)
    trainer.reward_fn = lambda x0, labels=None: torch.full((8,), float("inf"))
    assert trainer.step(1)["skipped_batches"] == 2.0
    assert torch.equal(before, params(trainer.policy))


def test_nan_gradient_step_skipped_and_counted():
    torch.manual_seed(0)
    trainer = PPOTrainer(tiny_config(ema_decay=0.5), TinyEps(), brightness, "cpu")
    before, ema_before = params(trainer.policy), params(trainer.ema)
    handle = trainer.policy.c2.bias.register_hook(lambda g: g * float("nan"))
    stats = trainer.step(0)
    assert stats["skipped_steps"] == 1.0 and stats["skipped_batches"] == 0.0
    assert torch.equal(before, params(trainer.policy)) and torch.equal(ema_before, params(trainer.ema))
    handle.remove()
    stats = trainer.step(1)
    assert stats["skipped_steps"] == 1.0
    assert not torch.equal(before, params(trainer.policy))
    assert torch.isfinite(params(trainer.policy)).all()


def test_policy_steps_are_the_stochastic_steps():
    """A deterministic step (sigma = 0: the last one with set_alpha_to_one) is the environment's: no floor is
    needed for it. Only a sampler without any stochastic step (eta = 0) is an error, unless ppo.sample_at_floor
    samples every step at sigma_floor."""
    cfg = tiny_config(True, sigma_floor=0.0)
    trainer = PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    assert float(trainer.plan.sigma[-1]) == 0.0 and trainer.policy_steps == trainer.trained_steps == [0, 1, 2]
    cfg.sampling.eta = 0.0
    for floor in (0.0, 0.05):  # a floor alone scores, it does not sample
        cfg.ppo.sigma_floor = floor
        with pytest.raises(ConfigError, match=r"every DDIM step is deterministic .* sampling.eta > 0"):
            PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    cfg.ppo.sample_at_floor = True
    trainer = PPOTrainer(cfg, TinyEps(), brightness, "cpu")  # sigma_floor 0.05: every step samples at it
    assert trainer.plan.sigma.tolist() == [f32(0.05)] * 4 and trainer.policy_steps == [0, 1, 2, 3]
    cfg.ppo.sigma_floor = 0.0
    with pytest.raises(ConfigError, match="deterministic"):
        PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    with pytest.raises(ConfigError, match="ppo.sigma_floor must be >= 0, got -0.1"):
        check_policy_steps(trainer.plan, -0.1)


def test_bad_reward_shape_is_an_error():
    trainer = PPOTrainer(tiny_config(), TinyEps(), lambda x0, labels=None: x0.mean(), "cpu")
    with pytest.raises(ValueError, match="shape"):
        trainer.rollout(seed=0)


@pytest.mark.parametrize("objective", ["trajectory", "per_step"])
def test_short_run_raises_the_reward(objective):
    torch.manual_seed(0)
    cfg = tiny_config(True, objective=objective, lr=3e-3, batch_size=8, microbatch=8, num_epochs=2,
                      num_minibatches=2, clip_range=0.2, per_step_clip=1.0, global_clip=3.0)
    trainer = PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    base = float(brightness(trainer.sample(x_T, seed=1)).mean())
    history = [trainer.step(i)["reward_mean"] for i in range(10)]
    tuned = float(brightness(trainer.sample(x_T, seed=1)).mean())
    assert tuned > base + 0.1, (base, tuned, history)
    assert sum(history[-3:]) > sum(history[:3])


def test_group_advantages_class_conditional_and_state_dict_roundtrip():
    torch.manual_seed(0)
    cfg = tiny_config(advantage="group", group_min_count=1, ema_decay=0.9, kl_beta=0.1)
    cfg.model.num_classes = 3
    trainer = PPOTrainer(cfg, TinyEps(num_classes=3), brightness, "cpu")
    cache, info = trainer.rollout(seed=4)
    assert cache.group_ids.max() < 3
    for g in cache.group_ids.unique():  # per-group normalisation over this first batch
        adv = cache.advantages[cache.group_ids == g]
        if adv.numel() > 1:
            assert abs(float(adv.mean())) < 1e-4
    trainer.update(cache)
    state = copy.deepcopy(trainer.state_dict())  # as if through a checkpoint file: no shared tensors
    other = PPOTrainer(cfg, TinyEps(num_classes=3), brightness, "cpu")
    other.load_state_dict(state)
    assert torch.equal(params(other.policy), params(trainer.policy))
    assert torch.equal(params(other.ema), params(trainer.ema))
    assert torch.equal(params(other.ref_policy), params(trainer.ref_policy))
    a, b = trainer.step(1), other.step(1)
    assert a["reward_mean"] == b["reward_mean"] and a["loss"] == b["loss"]
    assert torch.equal(params(other.policy), params(trainer.policy))


def test_update_reports_trust_region_diagnostics_of_the_off_policy_minibatches():
    """update(): loss/kl/grad_norm over all minibatches; the diagnostics (objective.RATIO_STATS, top_step) only
    over the minibatches after the first optimizer step (the first runs at r = 1). Checked against the hand
    maths of the ratio pass of minibatch 2 (strict mask) on a replay of the same update."""
    cfg = tiny_config(True, num_minibatches=2, batch_size=8, microbatch=4, lr=3e-4, per_step_clip=0.05, global_clip=0.05,
                      clip_range=0.03, kl_beta=0.1)
    torch.manual_seed(0)
    one = copy.deepcopy(cfg)
    one.ppo.num_minibatches = 1
    single = PPOTrainer(one, TinyEps().double(), brightness, "cpu")
    single.rollout(seed=2)
    stats = single.update(single.cache)
    assert not set(RATIO_STATS) & set(stats) and "top_step" not in stats  # one minibatch: none off-policy
    assert {"loss", "kl", "grad_norm"} <= set(stats)

    def make():
        torch.manual_seed(0)
        t = PPOTrainer(cfg, TinyEps().double(), brightness, "cpu")
        t.rollout(seed=2)
        return t

    trainer = make()
    stats = trainer.update(trainer.cache)
    assert set(RATIO_STATS) - {"step_abs_log_ratio"} <= set(stats) and "step_abs_log_ratio" not in stats

    replay = make()  # the same update by hand: minibatch 1, optimizer step, then minibatch 2's ratio pass
    seed = derive_seed(cfg.seed, 0, 0, 0)
    minibatches = replay.cache.minibatch_plan(seed, 2)
    steps = replay.cache.timestep_plan(seed, replay.steps_per_sample, trained(replay))
    replay.minibatch_gradient(minibatches[0], steps[minibatches[0]])
    replay._apply_gradients()
    rows = minibatches[1]
    l = replay.ratio_pass(rows)  # [n_train, m] float64, raw
    p = cfg.ppo
    total_raw = l.sum(0)
    total = l.clamp(-p.per_step_clip, p.per_step_clip).sum(0)
    r = total.clamp(-p.global_clip, p.global_clip).exp()
    outside = (r - 1).abs() > p.clip_range
    keep = (l.abs() <= p.per_step_clip).all(0) & (total.abs() <= p.global_clip) & ~outside
    mean_abs = l.abs().mean(1)  # every sample trains every trained step here (timestep_fraction 1)
    want = {
        "log_ratio_raw_mean": float(total_raw.mean()), "log_ratio_raw_abs_max": float(total_raw.abs().max()),
        "approx_kl": float((total_raw.exp() - 1 - total_raw).mean()),  # k3; |log r| < 50, below the cap
        "clipfrac": float(outside.double().mean()),
        "step_clipfrac": float((l.abs() > p.per_step_clip).double().mean()),
        "global_clipfrac": float((total.abs() > p.global_clip).double().mean()), "keep_frac": float(keep.double().mean()),
        "top_step_share": float(mean_abs.max() / mean_abs.sum()), "top_step": replay.trained_steps[int(mean_abs.argmax())],
    }
    assert abs(want["log_ratio_raw_mean"]) > 1e-3 and total_raw.abs().max() < 50  # off-policy indeed
    assert 0 < want["keep_frac"] < 1 and 0 < want["clipfrac"] < 1 and want["step_clipfrac"] > 0
    for k, v in want.items():
        assert stats[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
