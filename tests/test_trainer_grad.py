"""The trainer's two-pass, step-by-step, micro-batched gradient equals autograd through the plain
loss written here (all steps with grad at once), at params != old, with the KL term on.

Reference (float64 model, CPU; the DDIM step/log-prob maths of ``ddim_step_reference``, float64 here).
The trajectory reduction hands the gradient pass float32 weights w_b (the cache's log-probs and the
reduction are float32 by design), so the two gradients agree to ~3e-8 relative, which the tolerances
reflect:

    l_{t,b}  = log N(x_{t+1}; mu_theta(x_t), s_t^2) - logp_old_{t,b}
    log r_b  = clamp(sum_t clamp(l_{t,b}, +-c), +-C),  r_b = exp(log r_b)
    mask_b   = no per-step clip, no global clip, r_b in [1-e, 1+e]
    L_traj   = -mean_b(mask_b * r_b * A_b)          (its gradient; value: min form)
    L_ddpo   = mean_t -mean_b min(r_tb A_b, clip(r_tb, 1-e, 1+e) A_b),  r_tb = exp(clamp(l_tb, +-c))
    L_KL     = beta * sum_t mean_b ||mu_theta - mu_ref||^2 / (2 s_t^2)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ppo_ddpm.config import Config
from ppo_ddpm.ddpm.ddim import ddim_step_reference
from ppo_ddpm.ppo import PPOTrainer


class TinyEps(nn.Module):
    """eps(x, t, y) = conv(tanh(conv(x) + W t/1000 [+ E y])): a tiny stand-in for the UNet."""

    def __init__(self, channels: int = 1, hidden: int = 6, num_classes: int = 0):
        super().__init__()
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.temb = nn.Linear(1, hidden)
        self.yemb = nn.Embedding(num_classes, hidden) if num_classes else None
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        h = self.c1(x) + self.temb((t.to(x.dtype) / 1000)[:, None])[:, :, None, None]
        if self.yemb is not None:
            h = h + self.yemb(class_labels)[:, :, None, None]
        return self.c2(torch.tanh(h))


def brightness(x0, labels=None):
    return x0.mean((1, 2, 3))


def tiny_config(**ppo) -> Config:
    cfg = Config()
    cfg.model.in_channels, cfg.model.sample_size = 1, 4
    cfg.sampling.num_inference_steps = 4
    cfg.sampling.set_alpha_to_one = False  # every step stochastic
    cfg.ppo.batch_size, cfg.ppo.microbatch = 8, 3  # uneven micro-batches
    cfg.ppo.use_kernels = False
    cfg.ppo.sigma_floor = 0.1
    for k, v in ppo.items():
        setattr(cfg.ppo, k, v)
    return cfg


def reference_step_terms(trainer: PPOTrainer, cache, ref: nn.Module):
    """All steps with grad at once -> (l [n, B] raw log-ratios, kl [n, B])."""
    plan, kw = trainer.plan, dict(clip_x0=trainer.cfg.sampling.clip_x0, sigma_floor=trainer.pcfg.sigma_floor)
    ls, kls = [], []
    for i in range(plan.num_steps):
        x, a = cache.state(i).to(trainer.dtype), cache.state(i + 1).to(trainer.dtype)
        t = plan.timesteps[i].expand(x.shape[0])
        coefs = (plan.abar_t[i], plan.abar_prev[i], plan.sigma[i])
        _, mu, lp = ddim_step_reference(x, trainer.policy(x, t), *coefs, x_prev=a, **kw)
        with torch.no_grad():
            _, mu_ref, _ = ddim_step_reference(x, ref(x, t), *coefs, x_prev=a, **kw)
        s = plan.sigma[i].clamp_min(trainer.pcfg.sigma_floor).to(trainer.dtype)
        ls.append(lp - cache.log_probs[i])
        kls.append((mu - mu_ref).pow(2).flatten(1).sum(1) / (2 * s * s))
    return torch.stack(ls), torch.stack(kls)


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def setup(objective: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(objective=objective, kl_beta=0.3, per_step_clip=0.25, global_clip=0.4, clip_range=0.15)
    policy = TinyEps().double()
    trainer = PPOTrainer(cfg, policy, brightness, "cpu")
    cache, info = trainer.rollout(seed=123)
    assert info["skipped"] == 0
    with torch.no_grad():  # params != old: ratios != 1, some clips active
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer.params_changed()
    B, n = cfg.ppo.batch_size, trainer.n
    rows = torch.randperm(B)
    steps = cache.timestep_plan(7, n, 0)[rows]  # timestep_fraction = 1: every step, per-sample order
    return trainer, cache, rows, steps


def test_trajectory_gradient_equals_autograd():
    trainer, cache, rows, steps = setup("trajectory")
    p = trainer.pcfg
    stats = trainer.minibatch_gradient(cache, rows, steps)
    g_trainer = grads(trainer.policy)

    trainer.policy.zero_grad(set_to_none=True)
    l, kl = reference_step_terms(trainer, cache, trainer.ref_policy)
    c, C, e = p.per_step_clip, p.global_clip, p.clip_range
    A = cache.advantages.double()
    total = l.clamp(-c, c).sum(0)
    r = total.clamp(-C, C).exp()
    mask = (l.abs() <= c).all(0) & (total.abs() <= C) & (r >= 1 - e) & (r <= 1 + e)
    assert 0 < int(mask.sum()) < mask.numel(), "the test must mix masked and unmasked samples"
    assert bool((l.abs() > c).any()), "some per-step clips must be active"
    surrogate = -(mask.detach() * r * A).mean()
    (surrogate + p.kl_beta * kl.mean(1).sum()).backward()
    g_ref = grads(trainer.policy)

    assert g_ref.abs().max() > 1e-3
    torch.testing.assert_close(g_trainer, g_ref, rtol=1e-6, atol=1e-7 * float(g_ref.abs().max()))
    # the loss value is the min form (plus the KL value)
    min_form = -torch.minimum(r * A, r.clamp(1 - e, 1 + e) * A).mean()
    kl_value = p.kl_beta * kl.mean(1).sum()
    min_form, kl_value = min_form.detach(), kl_value.detach()
    assert abs(float(stats["loss"]) - float(min_form + kl_value)) < 1e-5 * max(1.0, abs(float(min_form)))
    assert abs(float(stats["kl"]) - float(kl_value)) < 1e-6 * max(1.0, float(kl_value))


def test_per_step_gradient_equals_autograd_ddpo():
    trainer, cache, rows, steps = setup("per_step")
    p = trainer.pcfg
    stats = trainer.minibatch_gradient(cache, rows, steps)
    g_trainer = grads(trainer.policy)

    trainer.policy.zero_grad(set_to_none=True)
    l, kl = reference_step_terms(trainer, cache, trainer.ref_policy)
    e, A = p.clip_range, cache.advantages.double()
    r = l.clamp(-p.per_step_clip, p.per_step_clip).exp()  # [n, B]
    assert bool(((r - 1).abs() > e).any()) and bool(((r - 1).abs() <= e).any())
    ddpo = (-torch.minimum(r * A, r.clamp(1 - e, 1 + e) * A).mean(1)).mean()
    loss = ddpo + p.kl_beta * kl.mean(1).sum()
    loss.backward()
    g_ref = grads(trainer.policy)
    loss = loss.detach()

    torch.testing.assert_close(g_trainer, g_ref, rtol=1e-6, atol=1e-7 * float(g_ref.abs().max()))
    assert abs(float(stats["loss"]) - float(loss)) < 1e-5 * max(1.0, abs(float(loss)))


def test_timestep_subset_and_last_k_are_unbiased_scalings():
    """With K < n_train steps per sample, the gradient is (n_train / K) x the sum over the chosen
    steps; train_last_k restricts the trained steps to the last k (ratio pass included)."""
    torch.manual_seed(1)
    cfg = tiny_config(kl_beta=0.0, per_step_clip=None, global_clip=None, clip_range=10.0,
                      train_last_k=3, timestep_fraction=0.5)
    trainer = PPOTrainer(cfg, TinyEps().double(), brightness, "cpu")
    cache, _ = trainer.rollout(seed=5)
    with torch.no_grad():
        for q in trainer.policy.parameters():
            q.add_(0.02 * torch.randn_like(q))
    trainer.params_changed()
    assert (trainer.first_step, trainer.n_train, trainer.K) == (1, 3, 2)
    rows = torch.arange(8)
    steps = cache.timestep_plan(3, trainer.K, trainer.first_step)
    assert int(steps.min()) >= 1
    trainer.minibatch_gradient(cache, rows, steps)
    g_trainer = grads(trainer.policy)

    trainer.policy.zero_grad(set_to_none=True)
    l, _ = reference_step_terms(trainer, cache, trainer.policy)
    A = cache.advantages.double()
    r = l[1:].sum(0).exp().detach()  # trajectory ratio over the trained steps 1..3 (no clip active)
    chosen = torch.zeros_like(l, dtype=torch.bool)
    chosen[steps.T, torch.arange(8).expand(2, 8)] = True
    surrogate = -((r * A)[None] * l * chosen).sum() / 8 * (3 / 2)
    surrogate.backward()
    torch.testing.assert_close(g_trainer, grads(trainer.policy), rtol=1e-6, atol=1e-9)
