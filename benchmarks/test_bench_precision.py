"""The policy's precision paths, on the same model, config and reward:

- ``ppo_precision:T<n>:B<B>``: one full PPO iteration (rollout + update) of PPOTrainer with
  ``fp32`` (TF32 allowed, CUDA graphs: the default), ``fp32-no-tf32`` (exact fp32), ``fp32-no-graphs``
  (no CUDA graph of the rollout, ratio pass and with-grad step), ``bf16`` (autocast UNet) and
  ``bf16-channels-last``; samples/s = B / median seconds per iteration, and the iteration's peak
  memory (CUDA ``max_memory_allocated``; on the CPU the process's max RSS, which only grows).

On the CPU only ``fp32`` and ``bf16`` run (TF32, channels_last and CUDA graphs do nothing there).
CUDA: configs/default.yaml (CIFAR-size UNet, B=64). CPU: configs/smoke.yaml (tiny UNet, B=8).
"""
from __future__ import annotations

import itertools

import pytest

from benchmarks.harness import (
    BATCH, DEVICE, ON_CUDA, annotate, bench_config, first_call_s, make_policy, mean_pixel_reward, median_s, model_info, sync,
)

PPOTrainer = pytest.importorskip("ppo_ddpm.ppo").PPOTrainer

STEPS = 10
ROUNDS = 3
PRECISIONS = {
    "fp32": (),
    "fp32-no-tf32": ("ppo.tf32=false",),
    "fp32-no-graphs": ("ppo.cuda_graphs=false",),
    "bf16": ("ppo.precision=bf16",),
    "bf16-channels-last": ("ppo.precision=bf16", "ppo.channels_last=true"),
}
CUDA_ONLY = {"fp32-no-tf32", "fp32-no-graphs", "bf16-channels-last"}


@pytest.mark.parametrize("impl", list(PRECISIONS))
def test_ppo_precision(benchmark, impl):
    if impl in CUDA_ONLY and not ON_CUDA:
        pytest.skip("TF32, channels_last and CUDA graphs have no effect on the CPU (the same run as fp32 / bf16)")
    cfg = bench_config(STEPS, overrides=PRECISIONS[impl])
    policy = make_policy(cfg)
    trainer = PPOTrainer(cfg, policy, mean_pixel_reward, DEVICE)
    its = itertools.count()
    last = {}

    def iteration():
        last.update(trainer.step(next(its)))
        sync()

    benchmark.group = f"ppo_precision:T{STEPS}:B{BATCH}"
    first = first_call_s(iteration)  # graph captures, Triton JIT, autocast warm-up
    p = trainer.precision
    annotate(benchmark, kind="ppo_precision", impl=impl, precision=cfg.ppo.precision, tf32=p.tf32, channels_last=p.channels_last,
             cuda_graphs=trainer.use_graphs, state_dtype=cfg.ppo.state_dtype, first_call_s=first, **model_info(cfg, policy))
    benchmark.pedantic(iteration, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(samples_per_s=BATCH / median_s(benchmark), peak_memory_mb=last["peak_memory_mb"],
                                loss=last.get("loss"), reward_mean=last.get("reward_mean"))
