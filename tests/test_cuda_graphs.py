"""CUDA graphs (skipped without a GPU): the captured rollout loop (UNet forward + fused ddim_step +
cache record) and the captured ratio pass give the same samples, log-probs and log-ratios as the
eager path for the same noise, on every replay."""
from __future__ import annotations

import copy

import pytest
import torch

from ppo_ddpm.ddpm.ddim import ddim_step_reference
from ppo_ddpm.ppo import PPOTrainer, RolloutNoise
from test_trainer_grad import TinyEps, brightness, tiny_config

pytestmark = pytest.mark.cuda

TOL = dict(rtol=1e-5, atol=1e-5)


def trainers():
    torch.manual_seed(0)
    cfg = tiny_config(use_kernels=True, cuda_graphs=True, kl_beta=0.1)
    policy = TinyEps(hidden=16).cuda()
    graphed = PPOTrainer(cfg, policy, brightness, "cuda")
    cfg_eager = copy.deepcopy(cfg)
    cfg_eager.ppo.cuda_graphs = False
    eager = PPOTrainer(cfg_eager, copy.deepcopy(policy), brightness, "cuda")
    assert graphed.use_graphs and not eager.use_graphs
    return graphed, eager


def test_graphed_rollout_matches_eager_for_the_same_noise():
    graphed, eager = trainers()
    for seed in (1, 2, 1):  # the first call captures, later calls replay with new noise
        cg, _ = graphed.rollout(seed)
        ce, _ = eager.rollout(seed)
        torch.testing.assert_close(cg.states, ce.states, **TOL)
        torch.testing.assert_close(cg.log_probs, ce.log_probs, **TOL)
        torch.testing.assert_close(cg.advantages, ce.advantages, **TOL)

    # explicit noise (the eager loop), checked against a plain reference loop
    B, n = graphed.pcfg.batch_size, graphed.n
    noise = RolloutNoise.draw(77, B, n, graphed.sample_shape, 0, "cuda", torch.float32)
    cg, _ = graphed.rollout(0, noise=noise)
    x, plan = noise.x_T, graphed.plan
    for i in range(n):
        t = plan.timesteps[i].expand(B)
        eps = graphed.policy(x, t)
        coefs = (plan.abar_t[i], plan.abar_prev[i], plan.sigma[i])
        x_next, _, _ = ddim_step_reference(x, eps, *coefs, noise=noise.z[i], clip_x0=1.0)
        _, _, lp = ddim_step_reference(x, eps, *coefs, x_prev=x_next, clip_x0=1.0, sigma_floor=graphed.pcfg.sigma_floor)
        torch.testing.assert_close(cg.state(i + 1), x_next, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cg.log_probs[i], lp, rtol=1e-4, atol=1e-2)
        x = x_next


def test_graphed_ratio_pass_matches_eager_and_sees_parameter_updates():
    graphed, eager = trainers()
    cg, _ = graphed.rollout(3)
    ce, _ = eager.rollout(3)
    B = graphed.pcfg.batch_size
    for round_ in range(2):  # the second round replays the captured graph after in-place param changes
        with torch.no_grad():
            for pg, pe in zip(graphed.policy.parameters(), eager.policy.parameters()):
                d = 0.01 * torch.randn_like(pg)
                pg.add_(d)
                pe.add_(d)
        graphed.params_changed()
        eager.params_changed()
        rows = torch.randperm(B, device="cuda")
        rg, re = graphed.ratio_pass(rows), eager.ratio_pass(rows)
        assert rg.abs().max() > 1e-4
        torch.testing.assert_close(rg, re, rtol=1e-4, atol=1e-4)
    # a whole update on the graphed trainer runs and stays finite
    stats = graphed.update(cg)
    assert all(v == v for v in stats.values())
