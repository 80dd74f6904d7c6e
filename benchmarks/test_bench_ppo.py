"""PPO-level groups on the same model, config and reward:

- ``rollout:T<n>:B<B>``: pass 1 of PPOTrainer (CUDA graph, eager) vs the DDPO-style eager sampler;
- ``ppo_iter:T<n>:B<B>``: a full iteration (rollout + update) of PPOTrainer (trajectory and
  per_step objectives) vs the DDPO-style loop; samples/s = B / median seconds per iteration;
- ``loss_check``: PPOTrainer's per_step loss equals the DDPO baseline's loss on the same rollout
  (asserted; the timing is the baseline's loss evaluation).

CUDA: configs/default.yaml (CIFAR-size ~35M-parameter UNet, B=64). CPU: configs/smoke.yaml (tiny UNet, B=8).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from benchmarks.ddpo_baseline import DDPOBaseline, DDPOSamples
from benchmarks.harness import (
    BATCH, DEVICE, ON_CUDA, annotate, bench_config, first_call_s, make_policy, mean_pixel_reward, median_s, model_info, sync,
)

PPOTrainer = pytest.importorskip("ppo_ddpm.ppo").PPOTrainer

ROLLOUT_STEPS = [10, 50]
ITER_STEPS = [10, 50] if ON_CUDA else [10]
ROUNDS = 5 if ON_CUDA else 3


def _seeds():
    return itertools.count(1)


@pytest.mark.parametrize("impl", ["graph", "eager", "ddpo"])
@pytest.mark.parametrize("steps", ROLLOUT_STEPS, ids=lambda t: f"T{t}")
def test_rollout(benchmark, steps, impl):
    if impl == "graph" and not ON_CUDA:
        pytest.skip("CUDA graphs need a CUDA device")
    cfg = bench_config(steps, overrides=(f"ppo.cuda_graphs={str(impl == 'graph').lower()}",))
    policy = make_policy(cfg)
    seeds = _seeds()
    if impl == "ddpo":
        runner = DDPOBaseline(cfg, policy, mean_pixel_reward, DEVICE)
        fn = lambda: (runner.sample(next(seeds)), sync())  # noqa: E731
    else:
        trainer = PPOTrainer(cfg, policy, mean_pixel_reward, DEVICE)
        fn = lambda: (trainer.rollout(next(seeds)), sync())  # noqa: E731
    benchmark.group = f"rollout:T{steps}:B{BATCH}"
    first = first_call_s(fn)  # captures the CUDA graph / JIT-compiles the kernels
    annotate(benchmark, kind="rollout", impl=impl, first_call_s=first, **model_info(cfg, policy))
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["samples_per_s"] = BATCH / median_s(benchmark)


@pytest.mark.parametrize("impl", ["trajectory", "per_step", "ddpo"])
@pytest.mark.parametrize("steps", ITER_STEPS, ids=lambda t: f"T{t}")
def test_ppo_iteration(benchmark, steps, impl):
    objective = "per_step" if impl == "ddpo" else impl
    cfg = bench_config(steps, overrides=(f"ppo.objective={objective}",))
    policy = make_policy(cfg)
    runner = DDPOBaseline(cfg, policy, mean_pixel_reward, DEVICE) if impl == "ddpo" else \
        PPOTrainer(cfg, policy, mean_pixel_reward, DEVICE)
    its = itertools.count()
    benchmark.group = f"ppo_iter:T{steps}:B{BATCH}"
    first = first_call_s(lambda: runner.step(next(its)))  # graph capture, JIT
    annotate(benchmark, kind="ppo_iter", impl=impl, cuda_graphs=bool(cfg.ppo.cuda_graphs and ON_CUDA), first_call_s=first,
             state_dtype=cfg.ppo.state_dtype, num_minibatches=cfg.ppo.num_minibatches, **model_info(cfg, policy))
    benchmark.pedantic(lambda: (runner.step(next(its)), sync()), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["samples_per_s"] = BATCH / median_s(benchmark)


def test_per_step_loss_matches_ddpo(benchmark):
    """Same rollout, same (perturbed) parameters: PPOTrainer(objective=per_step).update's loss
    equals the DDPO baseline's mean_j mean_b max(-A r, -A clip(r)). Not a timing assertion.
    One minibatch: with more, the trainer's reported loss averages minibatches evaluated after
    earlier optimizer steps (configs/default.yaml has 2), which the baseline's loss does not."""
    cfg = bench_config(10, overrides=("ppo.objective=per_step", "ppo.per_step_clip=null", "ppo.num_minibatches=1"))
    policy = make_policy(cfg)
    trainer = PPOTrainer(cfg, policy, mean_pixel_reward, DEVICE)
    cache, _ = trainer.rollout(seed=7)
    # move the policy away from the rollout's so that ratios differ from 1 and some get clipped
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    with torch.no_grad():
        for q in policy.parameters():
            q.add_(0.003 * q.abs().mean() * torch.randn(q.shape, generator=gen, device=DEVICE))
    trainer.params_changed()
    samples = DDPOSamples.from_cache(cache)
    baseline = DDPOBaseline(cfg, copy.deepcopy(policy), mean_pixel_reward, DEVICE)
    benchmark.group = "loss_check"
    annotate(benchmark, kind="loss_check", impl="ddpo_loss", **model_info(cfg, policy))
    ddpo_loss = float(benchmark.pedantic(baseline.loss, args=(samples,), rounds=ROUNDS, iterations=1))
    stats = trainer.update(cache)
    benchmark.extra_info.update(ddpo_loss=ddpo_loss, trainer_loss=stats["loss"], trainer_clipfrac=stats["clipfrac"],
                                trainer_approx_kl_k1=stats["approx_kl_k1"])
    assert 0.0 < stats["clipfrac"] < 1.0, f"the check needs some clipped and some unclipped ratios: {stats}"
    # CPU: both sides run the same reference maths. CUDA: the trainer's fused log-ratio vs the eager
    # reference, fp32 sums over D=3072 pixels with |log p| ~ 1e4, so ~1e-3 in log r per step.
    tol = 5e-3 if ON_CUDA else 1e-5
    benchmark.extra_info["tolerance"] = tol
    assert abs(stats["loss"] - ddpo_loss) <= tol * (1.0 + abs(ddpo_loss)), (stats["loss"], ddpo_loss)
