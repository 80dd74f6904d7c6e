"""Memory groups (the figures are bytes in extra_info; the timings are incidental):

- ``rollout_storage:T<n>``: the RolloutCache (the T actions x_{T-1} .. x_0, each also the next
  step's input, fp32 or bf16; x_T is not stored, the trainer keeps it) vs the DDPO-style storage
  (x_t and x_{t-1} per step, fp32) of the same CIFAR-shaped rollout (B=64, 3x32x32) on both
  devices: computed nbytes, plus the CUDA max_memory_allocated of building it on CUDA;
- ``train_memory``: peak memory of one update, PPOTrainer vs the DDPO-style loop, for T=10 and
  T=100 (CUDA: max_memory_allocated; CPU: peak bytes held by autograd for backward, parameters
  excluded, see harness.SavedTensorPeak), measured on a second rollout + update after a warm-up
  one (graph capture, Triton JIT and allocator growth are in the warm-up, timed as first_call_s).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.ddpo_baseline import DDPOBaseline, DDPOSamples
from benchmarks.harness import (
    DEVICE, ON_CUDA, SavedTensorPeak, annotate, bench_config, first_call_s, make_policy, mean_pixel_reward, model_info, sync,
)

rollout_cache = pytest.importorskip("ppo_ddpm.rollout_cache")
PPOTrainer = pytest.importorskip("ppo_ddpm.ppo").PPOTrainer

STORAGE_BATCH, STORAGE_SHAPE = 64, (3, 32, 32)
MEMORY_STEPS = [10, 100]
TRAIN_BATCH = 64 if ON_CUDA else 4
DTYPES = {"cache_fp32": torch.float32, "cache_bf16": torch.bfloat16}


def _cuda_peak(fn):
    """(result, bytes allocated above the starting point at the peak of ``fn``) on CUDA; (result, None) on CPU."""
    if not ON_CUDA:
        return fn(), None
    sync()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fn()
    sync()
    return out, torch.cuda.max_memory_allocated() - start


@pytest.mark.parametrize("impl", ["cache_fp32", "cache_bf16", "ddpo"])
@pytest.mark.parametrize("steps", MEMORY_STEPS, ids=lambda t: f"T{t}")
def test_rollout_storage(benchmark, steps, impl):
    B, T = STORAGE_BATCH, steps
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    states = [torch.randn((B, *STORAGE_SHAPE), generator=gen, device=DEVICE) for _ in range(T + 1)]
    log_probs = [torch.randn(B, generator=gen, device=DEVICE) for _ in range(T)]
    timesteps = torch.arange(T - 1, -1, -1, device=DEVICE) * (1000 // T)
    sigmas, rewards = torch.rand(T, device=DEVICE), torch.rand(B, device=DEVICE)
    adv = rollout_cache.normalize_advantages(rewards)

    if impl == "ddpo":
        def build():
            return DDPOSamples.from_trajectory(states, log_probs, timesteps, rewards, adv)
    else:
        def build():
            c = rollout_cache.RolloutCache(T, B, STORAGE_SHAPE, DTYPES[impl], DEVICE)
            c.set_schedule(timesteps, sigmas)
            for i, x in enumerate(states[1:], start=1):  # states 1..T: x_T is the trainer's
                c.record_state(i, x)
            for i, lp in enumerate(log_probs):
                c.record_logprob(i, lp)
            c.set_rewards(rewards, torch.zeros(B, dtype=torch.long, device=DEVICE))
            c.set_advantages(adv)
            return c

    store, cuda_peak = _cuda_peak(build)
    benchmark.group = f"rollout_storage:T{T}"
    annotate(benchmark, kind="storage", impl=impl, steps=T, batch=B, sample_shape=list(STORAGE_SHAPE),
             storage_bytes=int(store.nbytes()), cuda_peak_bytes=cuda_peak,
             extension=bool(getattr(rollout_cache, "HAS_EXTENSION", False)))
    del store
    benchmark.pedantic(lambda: (build(), sync()), rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", ["trainer", "ddpo"])
@pytest.mark.parametrize("steps", MEMORY_STEPS, ids=lambda t: f"T{t}")
def test_train_memory(benchmark, steps, impl):
    """Peak memory of one update on a fresh rollout; should not grow with T (step-by-step backward)."""
    cfg = bench_config(steps, batch=TRAIN_BATCH)
    policy = make_policy(cfg)
    if impl == "trainer":
        runner = PPOTrainer(cfg, policy, mean_pixel_reward, DEVICE)
        setup = lambda: ((runner.rollout(seed=1)[0],), {})  # noqa: E731
        update = runner.update
    else:
        runner = DDPOBaseline(cfg, policy, mean_pixel_reward, DEVICE)
        setup = lambda: ((runner.sample(seed=1),), {})  # noqa: E731
        update = runner.train
    peak = {}

    def measured_update(rollout):
        with SavedTensorPeak(policy.parameters()) as saved:
            _, peak["cuda_peak_bytes"] = _cuda_peak(lambda: update(rollout))
        peak["saved_tensor_peak_bytes"] = saved.peak
        if ON_CUDA:
            peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()

    benchmark.group = "train_memory"
    # warm-up: one rollout + update (CUDA-graph capture, Triton JIT, allocator growth), timed apart
    first = first_call_s(lambda: update(*setup()[0]))
    annotate(benchmark, kind="train_memory", impl=impl, state_dtype=cfg.ppo.state_dtype, first_call_s=first, **model_info(cfg, policy))
    benchmark.pedantic(measured_update, setup=setup, rounds=1, iterations=1)
    benchmark.extra_info.update(peak)
