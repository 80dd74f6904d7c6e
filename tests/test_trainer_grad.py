"""The trainer's two-pass, step-by-step, micro-batched gradient equals autograd of the PPO loss written
here by hand (every trained step with grad at once), at params != old, with the KL term on.

Reference (float64 policy, CPU), over the stochastic steps i only (a step with sigma_i = 0 is the
environment's), with the plan's float32 coefficients and s_i = max(sigma_i, float32(sigma_floor)):

    mu_i      = sqrt(abar_prev) clamp((x_i - sqrt(1 - abar_t) eps) / sqrt(abar_t), +-clip_x0) + sqrt(max(1 - abar_prev - sigma^2, 0)) eps
    logp_i    = -||x_{i+1} - mu_i||^2 / (2 s_i^2) - D log s_i - (D/2) log 2 pi               (float64)
    l_{i,b}   = (logp_i(theta) - logp_i(old)) / R,   R = 1 (sum) or D (mean)
    trajectory: log r_b = clamp(sum_i clamp(l_{i,b}, +-c), +-C),  r_b = exp(log r_b)
                strict: L = -mean_b mask_b r_b A_b (mask_b: nothing clipped; its gradient), value: min form
                ppo:    L = -mean_b min(r_b A_b, clip(r_b, 1-e, 1+e) A_b)            (autograd through the clamps)
    per_step:   r_{i,b} = exp(clamp(l_{i,b}, +-c))
                ppo:    L = mean_i -mean_b min(r_{i,b} A_b, clip(r_{i,b}, 1-e, 1+e) A_b)   (DDPO)
                strict: L = mean_i -mean_b keep_{i,b} r_{i,b} A_b (keep: r in [1-e, 1+e], l not clipped), value: min form
    KL_{i,b}  = ||mu_i(theta) - mu_i(ref)||^2 / (2 s_i^2 R);   L_KL = beta sum_i mean_b KL (trajectory),
                beta mean_i mean_b KL (per_step)
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ppo_ddpm.config import Config
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


def tiny_config(deterministic_last: bool = False, **ppo) -> Config:
    """4 DDIM steps on 1x4x4 samples. Default: trailing spacing, abar_prev of the last step = abar_0, so every
    step is stochastic (the last one with sigma ~ 0.01, scored at the floor 0.1). ``deterministic_last``:
    leading spacing with set_alpha_to_one, so the last step has sigma = 0 (the environment's)."""
    cfg = Config()
    cfg.model.in_channels, cfg.model.sample_size = 1, 4
    cfg.sampling.num_inference_steps = 4
    cfg.sampling.spacing = "leading" if deterministic_last else "trailing"
    cfg.sampling.set_alpha_to_one = deterministic_last
    cfg.ppo.batch_size, cfg.ppo.microbatch = 8, 3  # uneven micro-batches
    cfg.ppo.num_epochs = cfg.ppo.num_minibatches = 1  # one update per rollout unless a test says otherwise
    cfg.ppo.lr_warmup_steps = 0  # every optimizer step at ppo.lr, likewise
    cfg.ppo.use_kernels = False
    cfg.ppo.sigma_floor = 0.1
    for k, v in ppo.items():
        setattr(cfg.ppo, k, v)
    return cfg


def f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def hand_mean(model, plan, i: int, x: torch.Tensor, clip_x0) -> torch.Tensor:
    """DDIM mean of step i in float64 (module docstring), from the plan's float32 coefficients."""
    a_t, a_p, sig = (float(v[i]) for v in (plan.abar_t, plan.abar_prev, plan.sigma))
    eps = model(x.to(next(model.parameters()).dtype), plan.timesteps[i].expand(x.shape[0])).double()
    x0 = (x.double() - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    return math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sig * sig, 0.0)) * eps


def policy_scale(plan, i: int, sigma_floor: float) -> float:
    """s_i = max(sigma_i, float32(sigma_floor)), sigma_i the plan's float32 value."""
    return max(float(plan.sigma[i]), f32(sigma_floor))


def hand_log_prob(action: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    D = action[0].numel()
    sq = (action.double() - mu).pow(2).flatten(1).sum(1)
    return -sq / (2 * s * s) - D * math.log(s) - 0.5 * D * math.log(2 * math.pi)


def reference_terms(trainer: PPOTrainer, policy: nn.Module, old: nn.Module, ref: nn.Module | None, steps: list[int]):
    """(l [len(steps), B] with grad, KL [len(steps), B] with grad, logp_old [len(steps), B]) by hand, for
    ``policy`` (theta), ``old`` (the rollout's params) and ``ref`` (the KL's reference) on the trainer's cache."""
    plan, p = trainer.plan, trainer.pcfg
    clip_x0 = trainer.cfg.sampling.clip_x0
    R = math.prod(trainer.sample_shape) if p.log_prob_reduction == "mean" else 1
    ls, kls, olds = [], [], []
    for i in steps:
        x, action = trainer.state(i).double(), trainer.state(i + 1).double()  # state 0: the rollout's x_T
        s = policy_scale(plan, i, p.sigma_floor)
        mu = hand_mean(policy, plan, i, x, clip_x0)
        with torch.no_grad():
            logp_old = hand_log_prob(action, hand_mean(old, plan, i, x, clip_x0), s)
            mu_ref = hand_mean(ref, plan, i, x, clip_x0) if ref is not None else mu.detach()
        ls.append((hand_log_prob(action, mu, s) - logp_old) / R)
        kls.append((mu - mu_ref).pow(2).flatten(1).sum(1) / (2 * s * s * R))
        olds.append(logp_old)
    return torch.stack(ls), torch.stack(kls), torch.stack(olds)


def hand_loss(trainer: PPOTrainer, l: torch.Tensor, kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss whose gradient is the trainer's, its value, facts about the clips) from l, KL [n_train, B]."""
    p = trainer.pcfg
    A = trainer.cache.advantages.double()
    e = p.clip_range
    c = math.inf if p.per_step_clip is None else p.per_step_clip
    C = math.inf if p.global_clip is None else p.global_clip
    if p.objective == "trajectory":
        total = torch.clamp(l, -c, c).sum(0)
        r = torch.exp(torch.clamp(total, -C, C))
        min_form = -torch.minimum(r * A, torch.clamp(r, 1 - e, 1 + e) * A).mean()
        if p.grad_mask == "strict":
            mask = (l.abs() <= c).all(0) & (total.abs() <= C) & (r >= 1 - e) & (r <= 1 + e)
            surrogate = -(mask.detach() * r * A).mean()
        else:
            mask = (total.abs() <= C) & ~(((A > 0) & (r > 1 + e)) | ((A < 0) & (r < 1 - e)))
            surrogate = min_form
        L_kl = p.kl_beta * kl.mean(1).sum()
        facts = {"masked": int((~mask).sum()), "kept": int(mask.sum()), "step_clips": int((l.abs() > c).sum()),
                 "global_clips": int((total.abs() > C).sum())}
    else:
        r = torch.exp(torch.clamp(l, -c, c))
        min_form = (-torch.minimum(r * A, torch.clamp(r, 1 - e, 1 + e) * A).mean(1)).mean()
        if p.grad_mask == "strict":
            keep = ((r - 1).abs() <= e) & (l.abs() < c)
            surrogate = (-(keep.detach() * r * A).mean(1)).mean()
        else:
            surrogate = min_form
        L_kl = p.kl_beta * kl.mean(1).mean()
        outside = (r - 1).abs() > e
        facts = {"masked": int(outside.sum()), "kept": int((~outside).sum()), "step_clips": int((l.abs() > c).sum()),
                 "global_clips": 0}
    return surrogate + L_kl, (min_form + L_kl).detach(), facts


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def perturbed_trainer(cfg: Config, seed: int = 0, dtype=torch.float64, scale: float = 0.01):
    """Trainer on a float64 TinyEps after one rollout, then params moved off the rollout's: (trainer, old)."""
    torch.manual_seed(seed)
    trainer = PPOTrainer(cfg, TinyEps().to(dtype), brightness, "cpu")
    _, info = trainer.rollout(seed=123)
    assert info["skipped"] == 0
    old = copy.deepcopy(trainer.policy)
    with torch.no_grad():
        for q in trainer.policy.parameters():
            q.add_(scale * torch.randn_like(q))
    trainer.params_changed()
    return trainer, old


CASES = [("trajectory", "strict", "sum"), ("trajectory", "strict", "mean"), ("trajectory", "ppo", "sum"),
         ("trajectory", "ppo", "mean"), ("per_step", "ppo", "sum"), ("per_step", "ppo", "mean"), ("per_step", "strict", "sum")]
# clips that are active for each reduction (l is ~D = 16 times smaller under 'mean')
CLIPS = {"sum": dict(per_step_clip=0.25, global_clip=0.4, clip_range=0.15),
         "mean": dict(per_step_clip=0.25 / 16, global_clip=0.4 / 16, clip_range=0.15 / 16)}


@pytest.mark.parametrize("deterministic_last", [False, True], ids=["all_stochastic", "deterministic_last"])
@pytest.mark.parametrize("objective,grad_mask,reduction", CASES, ids=["-".join(c) for c in CASES])
def test_gradient_equals_autograd_of_the_hand_loss(objective, grad_mask, reduction, deterministic_last):
    cfg = tiny_config(deterministic_last, objective=objective, grad_mask=grad_mask, log_prob_reduction=reduction,
                      kl_beta=0.3, **CLIPS[reduction])
    trainer, old = perturbed_trainer(cfg)
    n = trainer.n
    stochastic = list(range(n - 1)) if deterministic_last else list(range(n))
    assert trainer.policy_steps == trainer.trained_steps == stochastic and trainer.n_train == len(stochastic)
    B = cfg.ppo.batch_size
    rows = torch.randperm(B)
    steps = trainer.cache.timestep_plan(7, trainer.n_train, torch.tensor(stochastic))[rows]  # per-sample order
    stats = trainer.minibatch_gradient(rows, steps)
    g_trainer = grads(trainer.policy)

    trainer.policy.zero_grad(set_to_none=True)
    l, kl, logp_old = reference_terms(trainer, trainer.policy, old, trainer.ref_policy, stochastic)
    # the rollout recorded the old log-probs of the stored actions, float64
    torch.testing.assert_close(trainer.cache.log_probs[stochastic], logp_old, rtol=1e-13, atol=0)
    loss, value, facts = hand_loss(trainer, l, kl)
    assert facts["masked"] > 0 and facts["kept"] > 0, f"the test must mix masked and unmasked samples: {facts}"
    assert facts["step_clips"] > 0, f"some per-step clips must be active: {facts}"
    if objective == "trajectory":
        assert facts["global_clips"] > 0, f"some global clips must be active: {facts}"
    loss.backward()
    g_ref = grads(trainer.policy)
    assert g_ref.abs().max() > 1e-3
    torch.testing.assert_close(g_trainer, g_ref, rtol=1e-9, atol=1e-9 * float(g_ref.abs().max()))
    kl_value = (kl.mean(1).sum() if objective == "trajectory" else kl.mean(1).mean()).detach()
    assert abs(float(stats["kl"]) - float(kl_value)) <= 1e-9 * float(kl_value)
    assert abs(float(stats["loss"]) - float(value)) <= 1e-9 * max(1.0, abs(float(value)))


def test_trajectory_gradient_through_the_kernels():
    """use_kernels=True (Triton in the CPU interpreter), float32 policy: the trainer's gradient vs the float64
    hand loss of the same parameters (a float64 copy of the float32 policy). Tolerance from float32: the
    fp32 forward/backward of the policy and of the DDIM mean, ~1e-7 relative per op, so 100 fp32 ulps of the
    largest gradient entry (measured: ~4 ulps)."""
    cfg = tiny_config(True, objective="trajectory", grad_mask="ppo", kl_beta=0.3, use_kernels=True, batch_size=6,
                      **CLIPS["sum"])
    trainer, old = perturbed_trainer(cfg, seed=1, dtype=torch.float32)
    stochastic = trainer.policy_steps
    assert stochastic == [0, 1, 2]
    rows = torch.arange(6)
    steps = trainer.cache.timestep_plan(2, trainer.n_train, torch.tensor(stochastic))
    trainer.minibatch_gradient(rows, steps)
    g_trainer = grads(trainer.policy).double()

    policy64 = copy.deepcopy(trainer.policy).double()  # the same parameters, float64: the hand loss
    policy64.zero_grad(set_to_none=True)
    l, kl, _ = reference_terms(trainer, policy64, old.double(), copy.deepcopy(trainer.ref_policy).double(), stochastic)
    loss, _, facts = hand_loss(trainer, l, kl)
    assert facts["masked"] > 0 and facts["kept"] > 0 and facts["step_clips"] > 0, facts
    p = cfg.ppo
    total = l.clamp(-p.per_step_clip, p.per_step_clip).sum(0)
    r = total.clamp(-p.global_clip, p.global_clip).exp()
    margin = min((l.abs() - p.per_step_clip).abs().min(), (total.abs() - p.global_clip).abs().min(),
                 (r - 1 - p.clip_range).abs().min(), (r - 1 + p.clip_range).abs().min())
    assert margin > 1e-4  # no sample sits within float32 noise of a clip boundary: the masks are the same
    loss.backward()
    g_ref = grads(policy64)
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(g_trainer, g_ref, rtol=0, atol=100 * eps32 * float(g_ref.abs().max()))


def test_the_deterministic_step_never_enters_log_r_gradient_or_kl():
    """Last step sigma = 0 (leading spacing, set_alpha_to_one): no log-prob is recorded for it (a NaN there
    stays NaN and reaches nothing), the ratio pass has n - 1 rows, and a policy term or a reference-model
    bump that acts only at its timestep changes neither the gradient nor the KL."""

    class LastStepTerm(nn.Module):
        """base(x, t) + w [t == t_last]: w only reaches the deterministic last step."""

        def __init__(self, base, t_last, w=0.0):
            super().__init__()
            self.base, self.t_last = base, t_last
            self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

        def forward(self, x, t, y=None):
            return self.base(x, t, y) + self.w * (t == self.t_last).to(x.dtype).view(-1, 1, 1, 1)

    cfg = tiny_config(True, kl_beta=0.3, **CLIPS["sum"])
    n, B = cfg.sampling.num_inference_steps, cfg.ppo.batch_size
    results = []
    for bump in (0.0, 5.0):
        torch.manual_seed(0)
        base = TinyEps().double()
        policy = LastStepTerm(base, t_last=0)
        ref = LastStepTerm(copy.deepcopy(base), t_last=0, w=bump)  # differs from the policy at the last step only
        trainer = PPOTrainer(cfg, policy, brightness, "cpu", ref_policy=ref)
        assert int(trainer.plan.timesteps[-1]) == 0 and float(trainer.plan.sigma[-1]) == 0.0
        trainer.cache.log_probs[n - 1].fill_(float("nan"))
        trainer.rollout(seed=5)
        assert torch.isnan(trainer.cache.log_probs[n - 1]).all() and torch.isfinite(trainer.cache.log_probs[: n - 1]).all()
        with torch.no_grad():
            for q in base.parameters():
                q.add_(0.01 * torch.randn_like(q))
            policy.w.fill_(0.7)  # changes the last step's mean only
        trainer.params_changed()
        rows = torch.arange(B)
        assert trainer.ratio_pass(rows).shape == (n - 1, B)
        steps = trainer.cache.timestep_plan(1, trainer.n_train, torch.tensor(trainer.trained_steps))
        assert int(steps.max()) == n - 2
        stats = trainer.minibatch_gradient(rows, steps)
        assert policy.w.grad is None or float(policy.w.grad) == 0.0
        results.append((grads(base), stats))
        assert all(torch.isfinite(v).all() for v in stats.values())
    (g0, s0), (g1, s1) = results
    assert torch.equal(g0, g1) and float(s0["kl"]) == float(s1["kl"]) > 0 and float(s0["loss"]) == float(s1["loss"])


@pytest.mark.parametrize("objective", ["trajectory", "per_step"])
def test_timestep_subset_and_last_k_are_unbiased_scalings(objective):
    """With K < n_train trained steps per sample, the gradient is (n_train / K) x the sum over the chosen steps
    (trajectory) or the mean over them (per_step); train_last_k counts stochastic steps (the deterministic
    last step is not one), and the ratio pass covers exactly the trained steps."""
    cfg = tiny_config(True, objective=objective, kl_beta=0.2, per_step_clip=None, global_clip=None, clip_range=10.0,
                      train_last_k=2, timestep_fraction=0.5)
    trainer, old = perturbed_trainer(cfg, seed=1, scale=0.02)
    assert trainer.policy_steps == [0, 1, 2] and trainer.trained_steps == [1, 2]
    assert (trainer.n_train, trainer.steps_per_sample) == (2, 1)
    B = cfg.ppo.batch_size
    rows = torch.arange(B)
    assert trainer.ratio_pass(rows).shape == (2, B)
    steps = trainer.cache.timestep_plan(3, 1, torch.tensor(trainer.trained_steps))
    assert set(steps.flatten().tolist()) == {1, 2}
    trainer.minibatch_gradient(rows, steps)
    g_trainer = grads(trainer.policy)

    trainer.policy.zero_grad(set_to_none=True)
    l, kl, _ = reference_terms(trainer, trainer.policy, old, trainer.ref_policy, [1, 2])
    A = trainer.cache.advantages.double()
    chosen = torch.zeros_like(l, dtype=torch.bool)
    chosen[steps[:, 0] - 1, torch.arange(B)] = True  # row j of l is step j + 1
    if objective == "trajectory":
        r = l.sum(0).exp().detach()  # trajectory ratio over the trained steps 1, 2 (no clip active)
        loss = -((r * A)[None] * l * chosen).sum() / B * (2 / 1) + 0.2 * (kl * chosen).sum() / B * (2 / 1)
    else:
        loss = -((l.exp() * A)[None] * chosen).sum() / B + 0.2 * (kl * chosen).sum() / B
    loss.backward()
    torch.testing.assert_close(g_trainer, grads(trainer.policy), rtol=1e-9, atol=1e-12)


def test_train_last_k_counts_stochastic_steps():
    cfg = tiny_config(True, train_last_k=4)
    with pytest.raises(ValueError, match=r"train_last_k must be in \[0, 3\] \(the stochastic DDIM steps\), got 4"):
        PPOTrainer(cfg, TinyEps(), brightness, "cpu")
    cfg.ppo.train_last_k = 3
    assert PPOTrainer(cfg, TinyEps(), brightness, "cpu").trained_steps == [0, 1, 2]
