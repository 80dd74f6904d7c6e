"""PPO on whole DDIM trajectories: the policy is the DDPM eps-model, an episode is the DDIM reverse
process (plan = ``make_ddim_plan(abar, n, eta, spacing, set_alpha_to_one)``), the frozen reward
scores x_0. Per-step policy: N(x_{i+1}; mu_theta(x_i, t_i), s_i^2 I), s_i = max(sigma_i, sigma_floor).

Two passes per iteration (peak memory independent of the number of steps):

1. ``rollout(seed)`` (no grad): x_T, labels, then the step noise z_i step by step, from a generator
   seeded by ``seed``; the DDIM loop records states and old log-probs in the RolloutCache
   (``rollout.rollout_loop``);
   rewards r_b = R(x_0), checked (a batch with NaN/inf is skipped and counted); advantages over
   the global batch (all_gather when distributed), the local slice kept.
2. ``update(cache)``: for each epoch and minibatch (``cache.minibatch_plan``) and the per-sample
   step subset (``cache.timestep_plan``, K = ceil(timestep_fraction * n_train) of the trained steps
   first_step..n-1, first_step = n - train_last_k):

   - ``trajectory``: a no-grad ratio pass over all trained steps gives l_{t,b} = logp_theta - logp_old
     (skipped while the params equal the rollout's: l = 0 exactly); ``trajectory_ppo`` turns it into
     the min-form loss value and weights w_b = -mask_b A_b r_b / B. The with-grad pass then runs step
     by step and micro-batch by micro-batch: forward at x_t, DDIM mean, kernel log r_t (per-step clip
     => zero grad), backward of sum_b w_b l_{t,b} * n_train / K. Summed over the steps this is exactly
     the gradient of L = -mean_b min(r_b A_b, clip(r_b) A_b) (``objective.py``).
   - ``per_step`` (DDPO): backward of -min(r_t A, clip(r_t) A) / (B K) per step and sample.
   - KL (kl_beta > 0): beta ||mu_theta - mu_ref||^2 / (2 s_t^2) / B * n_train / K per step and sample.

   Then gradients are averaged over ranks (one all_reduce), checked (non-finite: step skipped and
   counted), clipped to grad_clip, one AdamW step, EMA update.

The policy is put in eval mode (no dropout: log-probs must be reproducible); gradients still flow.
"""
from __future__ import annotations

import copy
import logging
import math
import resource
import time
from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from ..config import Config
from ..ddpm.ddim import DDIMPlan
from ..reward import check_reward, reward_step, term_means
from ..rollout_cache import GroupStatTracker, RolloutCache
from . import distributed as D
from .graphs import GraphedCall
from .objective import gaussian_kl, ppo_clip_loss, trajectory_step_loss
from .rollout import RolloutNoise, check_sigma_floor, compute_advantages, derive_seed, kernel_ops, ratio_loop, rollout_loop

log = logging.getLogger(__name__)

_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _frozen_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module).eval()
    m.requires_grad_(False)
    return m


class PPOTrainer:
    """PPO fine-tuning of ``policy`` (eps-model, forward(x, t, class_labels)) against ``reward_fn``.

    ``ref_policy``: the frozen reference of the KL term (default: a frozen copy of ``policy`` at
    construction, so build the trainer from the base model and then ``load_state_dict`` to resume).
    ``self.cache`` is one preallocated RolloutCache reused (overwritten) by every ``rollout``.
    """

    def __init__(self, cfg: Config, policy: nn.Module, reward_fn, device, *, ref_policy: Optional[nn.Module] = None):
        self.cfg, self.pcfg = cfg, cfg.ppo
        p = cfg.ppo
        self.device = torch.device(device)
        if isinstance(policy, nn.parallel.DistributedDataParallel):
            policy = policy.module  # gradients are averaged explicitly (distributed.all_reduce_grads)
        self.policy = policy.to(self.device).eval()
        self.dtype = next(self.policy.parameters()).dtype
        self.reward_fn = reward_fn
        plan = DDIMPlan.from_config(cfg)
        check_sigma_floor(plan, p.sigma_floor)
        self.plan = plan.to(self.device)
        self.n = plan.num_steps
        if not 0 <= p.train_last_k <= self.n:
            raise ValueError(f"ppo.train_last_k must be in [0, {self.n}] (sampling.num_inference_steps), got {p.train_last_k}")
        self.first_step = self.n - p.train_last_k if p.train_last_k > 0 else 0
        self.n_train = self.n - self.first_step
        if not 0 < p.timestep_fraction <= 1:
            raise ValueError(f"ppo.timestep_fraction must be in (0, 1], got {p.timestep_fraction}")
        self.K = math.ceil(p.timestep_fraction * self.n_train)
        if p.batch_size < 1 or p.num_minibatches < 1 or p.batch_size % p.num_minibatches:
            raise ValueError(f"ppo.batch_size={p.batch_size} must be a positive multiple of ppo.num_minibatches={p.num_minibatches}")
        if p.microbatch < 1:
            raise ValueError(f"ppo.microbatch must be >= 1, got {p.microbatch}")
        if p.clip_range <= 0:
            raise ValueError(f"ppo.clip_range must be > 0, got {p.clip_range}")
        self.num_classes = cfg.model.num_classes
        self.sample_shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
        self.ops = kernel_ops(p.use_kernels)
        self.params = [q for q in self.policy.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay)
        self.ref_policy = _frozen_copy(ref_policy if ref_policy is not None else self.policy).to(self.device) if p.kl_beta > 0 else None
        self.ema = _frozen_copy(self.policy) if p.ema_decay > 0 else None
        self.tracker = GroupStatTracker(p.group_buffer_size, p.group_min_count) if p.advantage == "group" else None
        self.cache = RolloutCache(self.n, p.batch_size, self.sample_shape, _STATE_DTYPES[p.state_dtype], self.device)
        self.cache.set_schedule(self.plan.timesteps, self.plan.sigma)
        # Static randomness buffers: x_T and labels, and ONE step-noise buffer refilled in place at
        # every step from self._gen (no [n, B, C, H, W] noise tensor is held).
        self._noise = RolloutNoise.empty(p.batch_size, self.sample_shape, self.num_classes, self.device, self.dtype)
        self._z = torch.empty(p.batch_size, *self.sample_shape, device=self.device, dtype=self.dtype)
        self._gen = torch.Generator(device=self.device)
        self.use_graphs = p.cuda_graphs and self.device.type == "cuda"
        self._graphs: dict = {}
        # Parameter version: bumped by every optimizer step / load; a cache whose rollout version
        # equals it was sampled by the current params, so its log-ratios are exactly 0.
        self._version = 0
        self._rollout_version: dict[int, int] = {}
        self._valid: dict[int, bool] = {}
        self.iteration = 0
        self.num_updates = 0
        self.skipped_batches = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------ pass 1

    def _kw(self) -> dict:
        return dict(clip_x0=self.cfg.sampling.clip_x0, sigma_floor=self.pcfg.sigma_floor,
                    prediction_type=self.cfg.model.prediction_type)

    def _labels(self, cache, rows: Optional[torch.Tensor] = None):
        if self.num_classes == 0:
            return None
        return cache.group_ids if rows is None else cache.group_ids.index_select(0, rows)

    def params_changed(self) -> None:
        """Declare that the policy's parameters changed outside the trainer (no ratio-pass skip)."""
        self._version += 1

    @torch.no_grad()
    def rollout(self, seed: int, *, noise: Optional[RolloutNoise] = None):
        """Pass 1 -> (self.cache, info). Randomness from a generator seeded by ``seed`` (x_T, labels,
        then z_i step by step), or ``noise``: explicit x_T/labels/z (always the eager loop)."""
        t0 = time.perf_counter()
        cache = self.cache
        if noise is not None:
            if noise.z is None or noise.z.shape[0] != self.n:
                raise ValueError(f"explicit rollout noise needs z of shape [{self.n}, B, ...] (RolloutNoise.draw)")
            self._noise.copy_start_(noise)
            rollout_loop(self.policy, self.plan, cache, self._noise, noise.z.__getitem__, self.ops, **self._kw())
        else:
            self._gen.manual_seed(seed)
            self._noise.fill_start_(self._gen, self.num_classes)
            draw = lambda i: self._z.normal_(generator=self._gen)  # noqa: E731
            run = lambda: rollout_loop(self.policy, self.plan, cache, self._noise, draw, self.ops, **self._kw())  # noqa: E731
            if self.use_graphs:
                if "rollout" not in self._graphs:
                    self._graphs["rollout"] = GraphedCall(run, generator=self._gen)
                    # capture consumed the generator: restart this rollout's stream before the replay
                    self._gen.manual_seed(seed)
                    self._noise.fill_start_(self._gen, self.num_classes)
                self._graphs["rollout"]()
            else:
                run()
        B = self.pcfg.batch_size
        labels = self._noise.labels
        x0 = cache.state(self.n).float()
        t_reward = time.perf_counter()
        r, finite = check_reward(self.reward_fn(x0, labels), B, getattr(self.reward_fn, "name", repr(self.reward_fn)))
        r, finite = r.to(self.device), finite.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        time_reward = time.perf_counter() - t_reward
        group_ids = labels if labels is not None else torch.zeros(B, dtype=torch.long, device=self.device)
        cache.set_rewards(torch.where(finite, r, torch.zeros_like(r)), group_ids)
        r_all, g_all = D.all_gather_cat(r), D.all_gather_cat(group_ids)
        nonfinite = int(D.all_gather_cat((~finite).to(torch.int32)).sum())
        info = {"skipped": float(nonfinite > 0), "nonfinite_rewards": float(nonfinite), "time_reward": time_reward,
                **term_means(self.reward_fn, D.all_gather_cat)}
        self._valid[id(cache)] = nonfinite == 0
        if nonfinite:
            self.skipped_batches += 1
            log.warning("rollout seed %d: %d non-finite rewards (NaN/inf) in the batch; skipped without an update "
                        "(%d skipped batches so far)", seed, nonfinite, self.skipped_batches)
        else:
            adv_all = compute_advantages(r_all, g_all, self.pcfg, self.tracker).to(self.device)
            adv = adv_all[D.rank() * B:(D.rank() + 1) * B]
            cache.set_advantages(adv)
            self._rollout_version[id(cache)] = self._version
            info.update(reward_mean=r_all.mean().item(), reward_std=r_all.std(unbiased=False).item(),
                        adv_mean=adv_all.mean().item(), adv_std=adv_all.std(unbiased=False).item(),
                        adv_abs_max=adv_all.abs().max().item())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        info["time_rollout"] = time.perf_counter() - t0
        return cache, info

    # ------------------------------------------------------------------ pass 2

    @torch.no_grad()
    def ratio_pass(self, cache, rows: torch.Tensor) -> torch.Tensor:
        """Raw per-step log r [n_train, m] of the samples ``rows`` under the current params."""
        m = rows.shape[0]
        if self._rollout_version.get(id(cache)) == self._version:
            return torch.zeros(self.n_train, m, device=self.device)
        kw = dict(ops=self.ops, dtype=self.dtype, **self._kw())
        if not self.use_graphs:
            out = torch.empty(self.n_train, m, device=self.device)
            return ratio_loop(self.policy, self.plan, cache, rows, self._labels(cache, rows), self.first_step, out, **kw)
        key = ("ratio", id(cache), m)
        if key not in self._graphs:
            rows_buf = rows.clone()
            out = torch.empty(self.n_train, m, device=self.device)
            fn = lambda: ratio_loop(self.policy, self.plan, cache, rows_buf, self._labels(cache, rows_buf),  # noqa: E731
                                    self.first_step, out, **kw)
            self._graphs[key] = (rows_buf, GraphedCall(fn))
        rows_buf, graph = self._graphs[key]
        rows_buf.copy_(rows)
        return graph().clone()

    def _step_chunk(self, cache, rows, steps, weights, total: int) -> dict[str, torch.Tensor]:
        """Backward of one micro-batch at one step per sample; rows, steps, weights: [m]; ``total`` = B."""
        p = self.pcfg
        x_t = cache.states[steps, rows].to(self.dtype)
        action = cache.states[steps + 1, rows].to(self.dtype)
        old = cache.log_probs[steps, rows]
        t, *coefs = self.plan.step(steps, rows.shape[0])
        labels = self._labels(cache, rows)
        eps = self.policy(x_t, t, labels)
        _, mu, _ = self.ops.ddim_step(x_t, eps, *coefs, x_prev=action, **self._kw())
        log_r = self.ops.log_ratio(action, mu, old, coefs[2], sigma_floor=p.sigma_floor, per_step_clip=p.per_step_clip)
        scale = self.n_train / self.K
        out = {}
        if p.objective == "trajectory":
            loss = trajectory_step_loss(log_r, weights) * scale
        else:
            per_sample = ppo_clip_loss(log_r, cache.advantages[rows], p.clip_range)
            loss = per_sample.sum() / (total * self.K)
            out["loss"] = loss.detach()
            ratio = log_r.detach().exp()
            out["clipfrac"] = ((ratio - 1).abs() > p.clip_range).float().sum() / (total * self.K)
            out["approx_kl_k1"] = (-log_r.detach()).sum() / (total * self.K)
            out["approx_kl_k3"] = (ratio - 1 - log_r.detach()).sum() / (total * self.K)
        if self.ref_policy is not None:
            with torch.no_grad():
                _, mu_ref, _ = self.ops.ddim_step(x_t, self.ref_policy(x_t, t, labels), *coefs, x_prev=action, **self._kw())
            kl = p.kl_beta * gaussian_kl(mu, mu_ref, coefs[2].clamp_min(p.sigma_floor)).sum() / total * scale
            loss = loss + kl
            out["kl"] = kl.detach()
        loss.backward()
        return out

    def minibatch_gradient(self, cache, rows: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Accumulate d L / d theta of the minibatch ``rows`` [m] into ``.grad`` (zeroed first), using
        the per-sample trained steps ``steps`` [m, K]. Returns tensor stats (no host sync)."""
        p = self.pcfg
        for q in self.params:
            q.grad = None
        m = rows.shape[0]
        stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        weights = torch.zeros(m, device=self.device)
        if p.objective == "trajectory":
            log_r_steps = self.ratio_pass(cache, rows)
            tp = self.ops.trajectory_ppo(log_r_steps, cache.advantages[rows], clip_range=p.clip_range,
                                         per_step_clip=p.per_step_clip, global_clip=p.global_clip)
            weights = tp.weights
            stats["loss"] = tp.loss.detach()
            for k, v in tp.stats.items():
                stats[k] = v.detach().float()
            stats["log_ratio_mean"] = tp.log_ratio.mean()
            stats["log_ratio_abs_max"] = tp.log_ratio.abs().max()
        for k in range(steps.shape[1]):
            for c in range(0, m, p.microbatch):
                sl = slice(c, c + p.microbatch)
                for name, v in self._step_chunk(cache, rows[sl], steps[sl, k], weights[sl], m).items():
                    stats[name] = stats[name] + v
        if "kl" in stats:
            stats["loss"] = stats["loss"] + stats["kl"]
        return dict(stats)

    def _apply_gradients(self) -> tuple[torch.Tensor, bool]:
        """all_reduce, non-finite check (skip + count), clip, AdamW step, EMA. -> (grad_norm, stepped)."""
        D.all_reduce_grads(self.params)
        for q in self.params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        max_norm = self.pcfg.grad_clip if self.pcfg.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not bool(torch.isfinite(norm)):
            self.skipped_steps += 1
            log.warning("non-finite gradient norm (%s); optimizer step skipped (%d skipped steps so far)",
                        float(norm), self.skipped_steps)
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._version += 1
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.policy.parameters()), 1 - self.pcfg.ema_decay)
                for b_ema, b in zip(self.ema.buffers(), self.policy.buffers()):
                    b_ema.copy_(b)
        return norm, True

    def update(self, cache) -> dict[str, float]:
        """PPO epochs x minibatches on ``cache`` (from ``rollout``) -> mean stats as floats."""
        if not self._valid.get(id(cache), False):
            raise ValueError("update(cache): the cache holds no valid rollout (not rolled out here, or its rewards were NaN/inf)")
        t0 = time.perf_counter()
        p = self.pcfg
        totals: dict[str, torch.Tensor] = defaultdict(float)
        grad_norms, count = [], 0
        for epoch in range(p.num_epochs):
            seed = derive_seed(self.cfg.seed, self.num_updates, epoch, D.rank())
            minibatches = cache.minibatch_plan(seed, p.num_minibatches).to(self.device)
            steps = cache.timestep_plan(seed, self.K, self.first_step).to(self.device)
            for rows in minibatches:
                for k, v in self.minibatch_gradient(cache, rows, steps[rows]).items():
                    totals[k] = totals[k] + v
                norm, _ = self._apply_gradients()
                grad_norms.append(norm)
                count += 1
        self.num_updates += 1
        stats = {k: float(v) / count for k, v in totals.items()}
        stats["grad_norm"] = float(torch.stack(grad_norms).float().mean())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats["time_update"] = time.perf_counter() - t0
        return stats

    def step(self, iteration: int) -> dict[str, float]:
        """One PPO iteration: rollout (seed from cfg.seed, iteration, rank), then update unless skipped."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with reward_step(iteration):  # plug-in rewards may ask for the iteration
            cache, stats = self.rollout(derive_seed(self.cfg.seed, iteration, D.rank()))
        if not stats["skipped"]:
            stats.update(self.update(cache))
        elapsed = stats["time_rollout"] + stats.get("time_update", 0.0)
        stats["samples_per_s"] = self.pcfg.batch_size * D.world() / max(elapsed, 1e-9)
        stats["peak_memory_mb"] = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        stats["skipped_batches"] = float(self.skipped_batches)
        stats["skipped_steps"] = float(self.skipped_steps)
        self.iteration = iteration + 1
        return stats

    # ------------------------------------------------------------------ eval / state

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, seed: int, policy: Optional[nn.Module] = None,
               class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_0 of the same DDIM plan from ``x_T`` [B, C, H, W]; step noise (and labels when the model is
        class-conditional and none are given) from a generator seeded by ``seed``."""
        policy = self.policy if policy is None else policy
        x = x_T.to(self.device, self.dtype)
        B = x.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if self.num_classes > 0 and class_labels is None:
            class_labels = torch.randint(0, self.num_classes, (B,), generator=gen, device=self.device)
        for i in range(self.n):
            t, *coefs = self.plan.step(i, B)
            z = torch.randn(x.shape, generator=gen, device=self.device, dtype=self.dtype)
            x, _, _ = self.ops.ddim_step(x, policy(x, t, class_labels), *coefs, noise=z, **self._kw())
        return x

    def state_dict(self) -> dict:
        """Policy, optimizer, EMA, reference, group tracker, counters (tensors/dicts/primitives only)."""
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ref_policy": self.ref_policy.state_dict() if self.ref_policy is not None else None,
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "counters": {"iteration": self.iteration, "num_updates": self.num_updates,
                         "skipped_batches": self.skipped_batches, "skipped_steps": self.skipped_steps},
        }

    def load_state_dict(self, d: dict) -> None:
        self.policy.load_state_dict(d["policy"])
        self.optimizer.load_state_dict(d["optimizer"])
        for name in ("ema", "ref_policy", "tracker"):
            own = getattr(self, name)
            if (own is None) != (d.get(name) is None):
                raise ValueError(f"trainer state_dict['{name}'] does not match the config (ppo.ema_decay / "
                                 "ppo.kl_beta / ppo.advantage differ from the checkpoint's)")
            if own is not None:
                own.load_state_dict(d[name])
        c = d["counters"]
        self.iteration, self.num_updates = int(c["iteration"]), int(c["num_updates"])
        self.skipped_batches, self.skipped_steps = int(c["skipped_batches"]), int(c["skipped_steps"])
        self.params_changed()
