"""CUDA graphs (skipped without a GPU): the captured rollout loop (UNet forward + fused ddim_step +
cache record) and the captured ratio pass give the same samples, log-probs and log-ratios as the
eager path for the same noise, on every replay; the captured with-grad micro-batch step (forward +
backward accumulating into static .grad tensors) gives the eager gradient for the same inputs, also
under bf16 autocast with channels_last, where log r stays exactly 0 at the rollout's parameters."""
from __future__ import annotations

import copy

import pytest
import torch

from ppo_ddpm.ddpm.ddim import ddim_step_reference
from ppo_ddpm.ppo import PPOTrainer, RolloutNoise
from test_trainer_grad import TinyEps, brightness, tiny_config

pytestmark = pytest.mark.cuda

TOL = dict(rtol=1e-5, atol=1e-5)


def trainers(**ppo):
    torch.manual_seed(0)
    cfg = tiny_config(use_kernels=True, cuda_graphs=True, kl_beta=0.1, **ppo)
    policy = TinyEps(hidden=16).cuda()
    graphed = PPOTrainer(cfg, policy, brightness, "cuda")
    cfg_eager = copy.deepcopy(cfg)
    cfg_eager.ppo.cuda_graphs = False
    eager = PPOTrainer(cfg_eager, copy.deepcopy(policy), brightness, "cuda")
    assert graphed.use_graphs and not eager.use_graphs
    return graphed, eager


def move_both(graphed, eager) -> None:
    """The same random step (in place) of both trainers' parameters, declared to both."""
    with torch.no_grad():
        for pg, pe in zip(graphed.policy.parameters(), eager.policy.parameters()):
            d = 0.01 * torch.randn_like(pg)
            pg.add_(d)
            pe.add_(d)
    graphed.params_changed()
    eager.params_changed()


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
        move_both(graphed, eager)
        rows = torch.randperm(B, device="cuda")
        rg, re = graphed.ratio_pass(rows), eager.ratio_pass(rows)
        assert rg.abs().max() > 1e-4
        torch.testing.assert_close(rg, re, rtol=1e-4, atol=1e-4)
    # a whole update on the graphed trainer runs and stays finite
    stats = graphed.update(cg)
    assert all(v == v for v in stats.values())


def grads(trainer) -> torch.Tensor:
    return torch.cat([q.grad.reshape(-1) for q in trainer.params])


def same_rollout(graphed, eager, seed: int = 5):
    """Both trainers roll out the same explicit noise (the eager loop in both): the same cache."""
    noise = RolloutNoise.draw(seed, graphed.pcfg.batch_size, graphed.n, graphed.sample_shape, 0, "cuda", torch.float32)
    cg, _ = graphed.rollout(0, noise=noise)
    ce, _ = eager.rollout(0, noise=noise)
    torch.testing.assert_close(cg.states, ce.states, rtol=0, atol=0)
    torch.testing.assert_close(cg.log_probs, ce.log_probs, rtol=0, atol=0)
    return cg


PRECISIONS = {"fp32": {}, "fp32-no-tf32": {"tf32": False}, "bf16-channels-last": {"precision": "bf16", "channels_last": True}}


@pytest.mark.parametrize("objective", ["trajectory", "per_step"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_graphed_gradient_matches_eager_for_the_same_inputs(objective, precision):
    """minibatch 8 x microbatch 3: graphs of 3 and of the last 2 samples; two minibatches replay them with new rows,
    steps and weights; then a whole update (4 optimizer steps) leaves both trainers with the same parameters."""
    graphed, eager = trainers(objective=objective, **PRECISIONS[precision])
    assert graphed.precision == eager.precision
    cache = same_rollout(graphed, eager)
    move_both(graphed, eager)
    B = graphed.pcfg.batch_size
    for seed in (1, 2):
        rows = torch.randperm(B, device="cuda")
        steps = cache.timestep_plan(seed, graphed.steps_per_sample, torch.tensor(graphed.trained_steps)).cuda()[rows]
        sg, se = graphed.minibatch_gradient(rows, steps), eager.minibatch_gradient(rows, steps)
        gg, ge = grads(graphed), grads(eager)
        assert ge.abs().max() > 0
        torch.testing.assert_close(gg, ge, rtol=1e-6, atol=1e-6 * float(ge.abs().max()))
        for k in se:
            torch.testing.assert_close(sg[k], se[k], rtol=1e-6, atol=1e-7)
    assert {k[0] for k in graphed._graphs if isinstance(k, tuple)} >= {"grad"}
    assert sorted(k[1] for k in graphed._graphs if isinstance(k, tuple) and k[0] == "grad") == [2, 3]
    stats = []
    for trainer in (graphed, eager):
        trainer.pcfg.num_epochs = trainer.pcfg.num_minibatches = 2  # minibatches of 4: chunks of 3 and 1
        stats.append(trainer.update(trainer.cache))
    for k in ("loss", "kl", "grad_norm"):  # grad_norm: the gradient's scale too (AdamW's step is scale-free)
        assert stats[0][k] == pytest.approx(stats[1][k], rel=1e-5, abs=1e-9), k
    lr = graphed.pcfg.lr
    for pg, pe in zip(graphed.policy.parameters(), eager.policy.parameters()):
        torch.testing.assert_close(pg, pe, rtol=0, atol=8 * lr)  # 4 AdamW steps of at most ~lr each


def test_bf16_channels_last_rollout_and_ratio_pass():
    """bf16 autocast + channels_last on CUDA: graphed rollout == eager for the same seed, and a ratio pass at the
    rollout's parameters over the rollout's batch (the same autocast forward) gives log r = 0 exactly."""
    graphed, eager = trainers(precision="bf16", channels_last=True)
    assert graphed.precision.channels_last and graphed.precision.autocast == torch.bfloat16
    assert all(q.is_contiguous(memory_format=torch.channels_last) for q in graphed.policy.parameters() if q.dim() == 4)
    B = graphed.pcfg.batch_size
    for seed in (1, 2):
        cg, _ = graphed.rollout(seed)
        ce, _ = eager.rollout(seed)
        torch.testing.assert_close(cg.states, ce.states, **TOL)
        torch.testing.assert_close(cg.log_probs, ce.log_probs, **TOL)
    for trainer in (graphed, eager):
        trainer.params_changed()
        assert bool((trainer.ratio_pass(torch.arange(B, device="cuda")) == 0).all())
