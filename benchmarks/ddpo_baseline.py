"""A DDPO-style PPO loop (Black et al. 2023, as in ``ddpo-pytorch``): the baseline of the benchmarks.

What makes it "DDPO-style", on purpose (these are the costs our engine removes):

- sampling: eager loop, per step eps = policy(x_j, t_j) and the DDIM step with its Gaussian
  log-prob in plain PyTorch (``ddim_step_reference``); no CUDA graphs, no fused kernels;
- storage: every step keeps both its input x_j and its action x_{j+1} in fp32
  (``latents`` and ``next_latents``, [B, T, C, H, W] each: the T-1 shared states are stored twice),
  plus per-sample timesteps [B, T] int64 and log-probs [B, T];
- training: per sample a random permutation of the steps; for each step a fresh forward, the
  per-step log-prob, r = exp(logp - logp_old) and DDPO's per-step clipped loss

      L_j = mean_b max(-A_b r_{j,b}, -A_b clip(r_{j,b}, 1-e, 1+e)),    L = mean_j L_j,

  each L_j / T backpropagated at once (gradient accumulation over the steps), then grad clip and
  one AdamW step per minibatch.

Differences from the original kept small and deliberate, so its loss equals our ``per_step``
objective on the same rollout: log-probs are summed over pixels with s = max(sigma, sigma_floor)
(DDPO averages over pixels), advantages are the global normalisation of ``ppo_ddpm.rollout_cache``
clamped to ppo.adv_clip, and there is no per-step log-ratio clip (run the comparison with
``ppo.per_step_clip: null``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ppo_ddpm.config import Config
from ppo_ddpm.ddpm.ddim import DDIMPlan, ddim_step_reference, make_ddim_plan
from ppo_ddpm.ddpm.schedules import NoiseSchedule
from ppo_ddpm.rollout_cache import normalize_advantages


@dataclass
class DDPOSamples:
    """One DDPO rollout batch. latents/next_latents [B, T, C, H, W] fp32 (duplicated states),
    log_probs [B, T] f32, timesteps [B, T] int64, rewards/advantages [B] f32."""

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor

    @classmethod
    def from_trajectory(cls, states: list[torch.Tensor], log_probs: list[torch.Tensor], timesteps: torch.Tensor,
                        rewards: torch.Tensor, advantages: torch.Tensor) -> "DDPOSamples":
        """DDPO's storage of T+1 states x_0..x_T [B, ...] and T log-probs [B]: stacked twice."""
        B = states[0].shape[0]
        return cls(
            latents=torch.stack([s.float() for s in states[:-1]], dim=1),
            next_latents=torch.stack([s.float() for s in states[1:]], dim=1),
            log_probs=torch.stack(log_probs, dim=1).float(),
            timesteps=timesteps.reshape(1, -1).expand(B, -1).clone(),
            rewards=rewards.float(),
            advantages=advantages.float(),
        )

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).numel() * getattr(self, f.name).element_size() for f in fields(self))


class DDPOBaseline:
    """Sample-then-train loop of ``policy`` on ``reward_fn`` with the hyperparameters of ``cfg``
    (sampling.*, ppo.batch_size/num_epochs/num_minibatches/microbatch/clip_range/adv_clip/
    grad_clip/lr/weight_decay/sigma_floor; model.* for the sample shape)."""

    def __init__(self, cfg: Config, policy: nn.Module, reward_fn, device):
        self.cfg, self.p = cfg, cfg.ppo
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval()
        s = cfg.sampling
        abar = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
        self.plan: DDIMPlan = make_ddim_plan(abar, s.num_inference_steps, s.eta, s.spacing, s.set_alpha_to_one).to(self.device)
        self.shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
        self.reward_fn = reward_fn
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.p.lr, weight_decay=self.p.weight_decay)

    def _step(self, x, eps, steps, **kw):
        """ddim_step_reference with the plan's coefficients at per-sample step indices ``steps`` [m]."""
        pl = self.plan
        return ddim_step_reference(x, eps, pl.abar_t[steps], pl.abar_prev[steps], pl.sigma[steps],
                                   clip_x0=self.cfg.sampling.clip_x0, sigma_floor=self.p.sigma_floor, **kw)

    @torch.no_grad()
    def sample(self, seed: int) -> DDPOSamples:
        """Eager DDIM rollout of ppo.batch_size samples from a generator seeded by ``seed``."""
        B, T = self.p.batch_size, self.plan.num_steps
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn((B, *self.shape), generator=gen, device=self.device)
        states, log_probs = [x], []
        for j in range(T):
            steps = torch.full((B,), j, device=self.device, dtype=torch.long)
            eps = self.policy(x, self.plan.timesteps[steps])
            x, _, lp = self._step(x, eps, steps, generator=gen)
            states.append(x)
            log_probs.append(lp)
        rewards = self.reward_fn(x, None).float().to(self.device)
        adv = normalize_advantages(rewards, adv_clip=self.p.adv_clip)
        return DDPOSamples.from_trajectory(states, log_probs, self.plan.timesteps, rewards, adv)

    def step_loss(self, s: DDPOSamples, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """DDPO's clipped per-step loss, mean over the samples ``rows`` [m] at their steps ``steps`` [m]."""
        x, action = s.latents[rows, steps], s.next_latents[rows, steps]
        eps = self.policy(x, s.timesteps[rows, steps])
        _, _, lp = self._step(x, eps, steps, x_prev=action)
        ratio = torch.exp(lp - s.log_probs[rows, steps])
        adv = s.advantages[rows]
        e = self.p.clip_range
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - e, 1 + e)).mean()

    @torch.no_grad()
    def loss(self, s: DDPOSamples) -> torch.Tensor:
        """L = mean_j L_j over all samples and steps at the current parameters (no update)."""
        B, T = s.advantages.shape[0], s.log_probs.shape[1]
        rows = torch.arange(B, device=self.device)
        return torch.stack([self.step_loss(s, rows, torch.full_like(rows, j)) for j in range(T)]).mean()

    def train(self, s: DDPOSamples, seed: int = 0) -> dict[str, float]:
        """ppo.num_epochs x num_minibatches AdamW steps; per-sample step permutations as DDPO."""
        B, T = s.advantages.shape[0], s.log_probs.shape[1]
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(self.p.num_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            perms = torch.stack([torch.randperm(T, generator=gen) for _ in range(B)]).to(self.device)
            for rows in order.chunk(self.p.num_minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=self.device)
                for j in range(T):
                    for mb in rows.split(self.p.microbatch):
                        loss = self.step_loss(s, mb, perms[mb, j]) * (mb.numel() / rows.numel()) / T
                        loss.backward()
                        total += loss.detach()
                if self.p.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.p.grad_clip)
                self.optimizer.step()
                losses.append(total)
        return {"loss": float(torch.stack(losses).mean())}

    def step(self, iteration: int) -> dict[str, float]:
        """One iteration: sample (seed = cfg.seed + iteration), then train."""
        samples = self.sample(self.cfg.seed + iteration)
        stats = self.train(samples, seed=iteration)
        stats["reward_mean"] = float(samples.rewards.mean())
        return stats
