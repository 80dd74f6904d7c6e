"""Two gloo processes on CPU, each with half the global batch (its own rank-offset seed), make the same
update as one process on the concatenated global batch: advantages over the global batch
(all_gather), gradients averaged over ranks (all_reduce after the step-by-step accumulation)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ppo_ddpm.ppo import PPOTrainer, RolloutNoise, derive_seed
from test_trainer_grad import TinyEps, brightness, tiny_config

WORLD, LOCAL_BATCH = 2, 4


def make_trainer(batch_size: int) -> PPOTrainer:
    torch.manual_seed(0)
    cfg = tiny_config(batch_size=batch_size, microbatch=3, kl_beta=0.2, lr=1e-3)
    return PPOTrainer(cfg, TinyEps().double(), brightness, "cpu")


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        trainer = make_trainer(LOCAL_BATCH)
        stats = trainer.step(0)  # rollout seed = derive_seed(cfg.seed, 0, rank)
        torch.save({"params": flat_params(trainer.policy), "advantages": trainer.cache.advantages.clone(),
                    "reward_mean": stats["reward_mean"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_update_equals_single_process_update(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    single = make_trainer(WORLD * LOCAL_BATCH)
    start = flat_params(single.policy)
    n, shape = single.n, single.sample_shape
    seeds = [derive_seed(single.cfg.seed, 0, r) for r in range(WORLD)]
    assert seeds[0] != seeds[1]  # seeds are offset per rank
    shards = [RolloutNoise.draw(s, LOCAL_BATCH, n, shape, 0, "cpu", torch.float64) for s in seeds]
    noise = RolloutNoise(torch.cat([r.x_T for r in shards]), None, torch.cat([r.z for r in shards], dim=1))
    cache, info = single.rollout(seed=0, noise=noise)
    single.update(cache)
    expected = flat_params(single.policy)

    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["advantages"], cache.advantages[r * LOCAL_BATCH:(r + 1) * LOCAL_BATCH],
                                   rtol=0, atol=1e-6)
        assert abs(got["reward_mean"] - info["reward_mean"]) < 1e-6
        assert (got["params"] - start).abs().max() > 1e-4  # the update moved the parameters
        torch.testing.assert_close(got["params"], expected, rtol=0, atol=1e-8)
    # the shards' advantages are normalized over the global batch, not per rank
    assert abs(float(ranks[0]["advantages"].mean())) > 1e-3
