"""PPO-level groups on the same model, config and reward:

- ``rollout:T<n>:B<B>``: pass 1 of PPOTrainer (CUDA graph, eager) vs the DDPO-style eager sampler;
- ``ppo_iter:T<n>:B<B>``: a full iteration (rollout + update) of PPOTrainer (trajectory and
  per_step objectives) vs the DDPO-style loop; samples/s = B / median seconds per iteration.

(That the per_step objective is DDPO's loss, value and gradient, is a test: ``tests/test_ddpo_loss.py``.)

CUDA: configs/default.yaml (CIFAR-size ~35M-parameter UNet, B=64). CPU: configs/smoke.yaml (tiny UNet, B=8).
"""
from __future__ import annotations

import itertools

import pytest

from benchmarks.ddpo_baseline import DDPOBaseline
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
