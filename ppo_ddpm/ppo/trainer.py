"""PPO on whole DDIM trajectories: the policy is the DDPM eps-model, an episode is the DDIM reverse
process (``DDIMPlan.from_config``), the frozen reward scores x_0. The policy's actions are the
stochastic steps (sigma_i > 0); a deterministic step belongs to the environment. Per-step policy:
N(x_{i+1}; mu_theta(x_i, t_i), s_i^2 I), s_i = max(sigma_i, sigma_floor). Per-step log-ratios
l_{i,b} = (log pi_theta - log pi_old) / R, R = 1 (``log_prob_reduction: sum``) or D pixels (``mean``).

Two passes per iteration (peak memory independent of the number of steps):

1. ``rollout(seed)`` (no grad): x_T, labels, then the step noise z_i step by step, from a generator
   seeded by ``seed``; the DDIM loop starts from x_T as drawn and records states 1..n (the actions)
   and old log-probs (float64) in the RolloutCache (``rollout.rollout_loop``); x_T itself stays in the
   trainer's static buffer, unrounded, and is state 0 of every pass (``state(0)``); rewards
   r_b = R(x_0), checked (a batch with NaN/inf is skipped and counted); advantages over the global
   batch (all_gather when distributed), the local slice kept.
2. ``update(cache)``: for each epoch and minibatch (``cache.minibatch_plan``) and the per-sample
   step subset (``cache.timestep_plan``: K = ceil(timestep_fraction * n_train) of the n_train trained
   steps, the last ``train_last_k`` stochastic steps or all of them):

   - ``trajectory``: a no-grad ratio pass over the trained steps gives l_{t,b} (skipped while the
     params equal the rollout's: l = 0 exactly); ``trajectory_ppo`` turns it into the min-form loss
     and weights w_b = -mask_b A_b r_b / B (``grad_mask`` rule). The with-grad pass then runs step by
     step and micro-batch by micro-batch: forward at x_t, DDIM mean, kernel l_t (per-step clip =>
     zero grad), backward of sum_b w_b l_{t,b} * n_train / K. Summed over the steps this is exactly
     the gradient of L = -mean_b min(r_b A_b, clip(r_b) A_b) (``objective.py``).
   - ``per_step`` (DDPO): backward of -min(r_t A, clip(r_t) A) / (B K) per step and sample.
   - KL (kl_beta > 0): beta KL_t,b, KL_t,b = ||mu_theta - mu_ref||^2 / (2 s_t^2 R), weighted per step as
     the objective weighs that step's log-ratio (summed over steps for ``trajectory``, averaged for
     ``per_step``), so kl_beta means the same for both.

   Then gradients are averaged over ranks (one all_reduce), checked (non-finite: step skipped and
   counted), clipped to grad_clip, one AdamW step, EMA update.

The policy is put in eval mode (no dropout: log-probs must be reproducible); gradients still flow.
Every UNet forward runs under ``ppo.precision`` / ``tf32`` / ``channels_last`` (``precision.py``). With
``ppo.cuda_graphs`` on CUDA the rollout, the ratio pass and each micro-batch's with-grad step replay
CUDA graphs (``graphs.py``) of the same code.
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
from ..ddpm.sample import ddim_loop
from ..reward import check_reward, reward_step, term_means
from ..rollout_cache import GroupStatTracker, RolloutCache
from ..utils.ema import ema_update_
from . import distributed
from .graphs import GraphedCall
from .objective import RATIO_STATS, gaussian_kl, per_step_surrogate, step_share, trajectory_step_loss, trust_region_stats
from .precision import UNetPrecision
from .rollout import RolloutNoise, check_policy_steps, compute_advantages, derive_seed, kernel_ops, ratio_loop, rollout_loop

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
        self.precision = UNetPrecision.from_config(p, self.device)  # every UNet forward goes through it
        self.precision.prepare(self.policy)
        self.reward_fn = reward_fn
        plan = DDIMPlan.from_config(cfg)
        self.policy_steps = check_policy_steps(plan, p.sigma_floor)
        self.plan = plan.to(self.device)
        self.n = plan.num_steps
        if not 0 <= p.train_last_k <= len(self.policy_steps):
            raise ValueError(f"ppo.train_last_k must be in [0, {len(self.policy_steps)}] (the stochastic DDIM steps), "
                             f"got {p.train_last_k}")
        self.trained_steps = self.policy_steps[-p.train_last_k:] if p.train_last_k > 0 else list(self.policy_steps)
        self.n_train = len(self.trained_steps)
        self.steps_per_sample = math.ceil(p.timestep_fraction * self.n_train)
        self.num_classes = cfg.model.num_classes
        self.sample_shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
        self.divisor = math.prod(self.sample_shape) if p.log_prob_reduction == "mean" else 1
        self.ops = kernel_ops(p.use_kernels)
        self.params = [q for q in self.policy.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay)
        self.ref_policy = _frozen_copy(ref_policy if ref_policy is not None else self.policy).to(self.device) if p.kl_beta > 0 else None
        self.ema = _frozen_copy(self.policy) if p.ema_decay > 0 else None
        self.precision.prepare(self.ref_policy)
        self.tracker = GroupStatTracker(p.group_buffer_size, p.group_min_count) if p.advantage == "group" else None
        self.cache = RolloutCache(self.n, p.batch_size, self.sample_shape, _STATE_DTYPES[p.state_dtype], self.device)
        self.cache.set_schedule(self.plan.timesteps, self.plan.sigma)
        self._trained = torch.tensor(self.trained_steps, dtype=torch.int64)
        # Static randomness buffers: x_T and labels, and ONE step-noise buffer refilled in place at
        # every step from self._gen (no [n, B, C, H, W] noise tensor is held).
        self._noise = RolloutNoise.empty(p.batch_size, self.sample_shape, self.num_classes, self.device, self.dtype)
        self._z = torch.empty(p.batch_size, *self.sample_shape, device=self.device, dtype=self.dtype)
        self._gen = torch.Generator(device=self.device)
        self.use_graphs = p.cuda_graphs and self.device.type == "cuda"
        self._graphs: dict = {}
        self._grads: Optional[list[torch.Tensor]] = None  # CUDA graphs: the static .grad tensors (graphs.py)
        # Parameter version: bumped by every optimizer step / load. While the cache's rollout version
        # equals it, the cache was sampled by the current params, so its log-ratios are exactly 0.
        self._version = 0
        self._rollout_version: Optional[int] = None  # None: the cache holds no valid rollout
        self.num_updates = 0
        self.optimizer_steps = 0  # taken (skipped ones excluded): the lr warm-up's clock
        self.skipped_batches = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------ pass 1

    def _kw(self) -> dict:
        return dict(clip_x0=self.cfg.sampling.clip_x0, sigma_floor=self.pcfg.sigma_floor,
                    prediction_type=self.cfg.model.prediction_type)

    def _labels(self, rows: Optional[torch.Tensor] = None):
        if self.num_classes == 0:
            return None
        return self.cache.group_ids if rows is None else self.cache.group_ids.index_select(0, rows)

    def params_changed(self) -> None:
        """Declare that the policy's parameters changed outside the trainer (no ratio-pass skip)."""
        self._version += 1

    @torch.no_grad()
    def rollout(self, seed: int, *, noise: Optional[RolloutNoise] = None):
        """Pass 1 -> (self.cache, info). Randomness from a generator seeded by ``seed`` (x_T, labels,
        then z_i step by step), or ``noise``: explicit x_T/labels/z (always the eager loop)."""
        t0 = time.perf_counter()
        cache = self.cache
        self._rollout_version = None
        unet = self.precision.bind(self.policy)
        loop = lambda draw: rollout_loop(unet, self.plan, cache, self._noise, draw, self.ops, self.policy_steps,  # noqa: E731
                                         **self._kw())
        if noise is not None:
            if noise.z is None or noise.z.shape[0] != self.n:
                raise ValueError(f"explicit rollout noise needs z of shape [{self.n}, B, ...] (RolloutNoise.draw)")
            self._noise.copy_start_(noise)
            loop(noise.z.__getitem__)
        else:
            self._gen.manual_seed(seed)
            self._noise.fill_start_(self._gen, self.num_classes)
            draw = lambda i: self._z.normal_(generator=self._gen)  # noqa: E731
            if self.use_graphs:
                if "rollout" not in self._graphs:
                    self._graphs["rollout"] = GraphedCall(lambda: loop(draw), generator=self._gen)
                    # capture consumed the generator: restart this rollout's stream before the replay
                    self._gen.manual_seed(seed)
                    self._noise.fill_start_(self._gen, self.num_classes)
                self._graphs["rollout"]()
            else:
                loop(draw)
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
        r_all, g_all = distributed.all_gather_cat(r), distributed.all_gather_cat(group_ids)
        nonfinite = int(distributed.all_gather_cat((~finite).to(torch.int32)).sum())
        info = {"skipped": float(nonfinite > 0), "nonfinite_rewards": float(nonfinite), "time_reward": time_reward,
                "nonfinite_samples": float((~x0.flatten(1).isfinite().all(1)).sum()),  # > 0: a diverged policy
                **term_means(self.reward_fn, distributed.all_gather_cat)}
        if nonfinite:
            self.skipped_batches += 1
            log.warning("rollout seed %d: %d non-finite rewards (NaN/inf) in the batch; skipped without an update "
                        "(%d skipped batches so far)", seed, nonfinite, self.skipped_batches)
        else:
            adv_all = compute_advantages(r_all, g_all, self.pcfg, self.tracker).to(self.device)
            rank = distributed.rank()
            cache.set_advantages(adv_all[rank * B:(rank + 1) * B])
            self._rollout_version = self._version
            info.update(reward_mean=r_all.mean().item(), reward_std=r_all.std(unbiased=False).item(),
                        adv_mean=adv_all.mean().item(), adv_std=adv_all.std(unbiased=False).item(),
                        adv_abs_max=adv_all.abs().max().item())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        info["time_rollout"] = time.perf_counter() - t0
        return cache, info

    def state(self, i: int) -> torch.Tensor:
        """x_i [B, C, H, W] of the current rollout: the start x_T for i = 0 (the static buffer, unrounded,
        policy dtype), else the cache's state i (its storage dtype)."""
        return self._noise.x_T if i == 0 else self.cache.state(i)

    # ------------------------------------------------------------------ pass 2

    def step_inputs(self, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, action) [m, C, H, W] in the policy dtype of the samples ``rows`` [m] at their steps ``steps`` [m]:
        state steps[j] (x_T where it is 0) and state steps[j] + 1. No host sync."""
        states = self.cache.states  # row i - 1 holds state i
        action = states[steps, rows].to(self.dtype)
        before = states[(steps - 1).clamp_min(0), rows].to(self.dtype)
        if 0 not in self.trained_steps:  # no step starts from x_T (e.g. train_last_k): nothing to select
            return before, action
        at_start = (steps == 0).view(-1, *(1,) * (before.dim() - 1))
        return torch.where(at_start, self._noise.x_T[rows], before), action

    @torch.no_grad()
    def ratio_pass(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw per-step l [n_train, m] float64 of the samples ``rows`` under the current params."""
        m = rows.shape[0]
        if self._rollout_version == self._version:
            return torch.zeros(self.n_train, m, dtype=torch.float64, device=self.device)
        kw = dict(ops=self.ops, dtype=self.dtype, divisor=self.divisor, **self._kw())
        unet = self.precision.bind(self.policy)
        if not self.use_graphs:
            out = torch.empty(self.n_train, m, dtype=torch.float64, device=self.device)
            return ratio_loop(unet, self.plan, self.cache, self.state, rows, self._labels(rows), self.trained_steps, out, **kw)
        key = ("ratio", m)
        if key not in self._graphs:
            rows_buf = rows.clone()
            out = torch.empty(self.n_train, m, dtype=torch.float64, device=self.device)
            fn = lambda: ratio_loop(unet, self.plan, self.cache, self.state, rows_buf, self._labels(rows_buf),  # noqa: E731
                                    self.trained_steps, out, **kw)
            self._graphs[key] = (rows_buf, GraphedCall(fn))
        rows_buf, graph = self._graphs[key]
        rows_buf.copy_(rows)
        return graph().clone()

    def _step_chunk(self, rows, steps, weights, total: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Backward of one micro-batch at one step per sample; rows, steps, weights: [m]; ``total`` = the
        minibatch size. -> (tensor stats, per-step log-ratio [m] as clipped by per_step_clip, detached)."""
        p, cache = self.pcfg, self.cache
        x_t, action = self.step_inputs(rows, steps)
        old = cache.log_probs[steps, rows]
        t, *coefs = self.plan.step(steps, rows.shape[0])
        labels = self._labels(rows)
        eps = self.precision.forward(self.policy, x_t, t, labels)
        _, mu, _ = self.ops.ddim_step(x_t, eps, *coefs, x_prev=action, **self._kw())
        log_r = self.ops.log_ratio(action, mu, old, coefs[2], sigma_floor=p.sigma_floor, per_step_clip=p.per_step_clip,
                                   reduction=p.log_prob_reduction)
        out = {}
        if p.objective == "trajectory":
            step_weight = self.n_train / self.steps_per_sample
            loss = trajectory_step_loss(log_r, weights) * step_weight
        else:
            step_weight = 1.0 / self.steps_per_sample
            value, surrogate, counts = per_step_surrogate(log_r, cache.advantages[rows], p.clip_range, p.per_step_clip, p.grad_mask)
            loss = surrogate.sum() / total * step_weight
            out["loss"] = value.detach().sum() / total * step_weight
            out.update({k: v / total * step_weight for k, v in counts.items()})
        if self.ref_policy is not None:
            with torch.no_grad():
                eps_ref = self.precision.forward(self.ref_policy, x_t, t, labels)
                _, mu_ref, _ = self.ops.ddim_step(x_t, eps_ref, *coefs, x_prev=action, **self._kw())
            kl = gaussian_kl(mu, mu_ref, coefs[2].clamp_min(p.sigma_floor)).sum() / (self.divisor * total) * step_weight
            loss = loss + p.kl_beta * kl
            out["kl"] = kl.detach()
        with self.precision.backend():
            loss.backward()
        return out, log_r.detach()

    def _chunk(self, rows, steps, weights, total: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``_step_chunk`` eagerly, or with CUDA graphs by replaying the graph captured for this micro-batch
        size (the full size and, when microbatch does not divide the minibatch, the last one's: shapes are
        fixed by the config, so at most two graphs) on static copies of rows, steps and weights. The
        outputs are the graph's static tensors: read them before the next call."""
        if not self.use_graphs:
            return self._step_chunk(rows, steps, weights, total)
        key = ("grad", rows.shape[0], total)
        if key not in self._graphs:
            inputs = (rows.clone(), steps.clone(), weights.clone())
            fn = lambda: self._step_chunk(*inputs, total)  # noqa: E731
            self._graphs[key] = (inputs, GraphedCall(fn, grads=self._grads))
        inputs, graph = self._graphs[key]
        for buf, value in zip(inputs, (rows, steps, weights)):
            buf.copy_(value)
        return graph()

    def _zero_grads(self) -> None:
        """Start a minibatch's gradient at 0: eagerly by dropping the .grad tensors (the first backward
        allocates them); with CUDA graphs by zeroing, in place, the static .grad tensors the captured
        backward accumulates into, and giving them back to the parameters."""
        if not self.use_graphs:
            for q in self.params:
                q.grad = None
            return
        if self._grads is None:
            self._grads = [torch.zeros_like(q) for q in self.params]
        for q, g in zip(self.params, self._grads):
            g.zero_()
            q.grad = g

    def minibatch_gradient(self, rows: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Accumulate d L / d theta of the minibatch ``rows`` [m] into ``.grad`` (zeroed first), using
        the per-sample trained steps ``steps`` [m, K]. Returns tensor stats (no host sync)."""
        p = self.pcfg
        self._zero_grads()
        m, K = rows.shape[0], steps.shape[1]
        stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        weights = torch.zeros(m, device=self.device)
        if p.objective == "trajectory":
            log_r_steps = self.ratio_pass(rows)
            tp = self.ops.trajectory_ppo(log_r_steps, self.cache.advantages[rows], clip_range=p.clip_range,
                                         per_step_clip=p.per_step_clip, global_clip=p.global_clip, grad_mask=p.grad_mask)
            weights = tp.weights
            stats["loss"] = tp.loss.detach()
            stats["keep_frac"] = tp.mask.float().mean()
            for k in ("clipfrac", "step_clipfrac", "global_clipfrac"):
                stats[k] = tp.stats[k].detach().float()
            stats.update(trust_region_stats(log_r_steps, self._trained.to(self.device)[:, None].expand(-1, m), self.n))
        per_step_l = torch.empty(K, m, device=self.device)
        for k in range(K):
            for c in range(0, m, p.microbatch):
                sl = slice(c, c + p.microbatch)
                chunk_stats, per_step_l[k, sl] = self._chunk(rows[sl], steps[sl, k], weights[sl], m)
                for name, v in chunk_stats.items():
                    stats[name] = stats[name] + v
        if p.objective == "per_step":
            stats.update(trust_region_stats(per_step_l, steps.T, self.n))
        if "kl" in stats:
            stats["loss"] = stats["loss"] + p.kl_beta * stats["kl"]
        return dict(stats)

    def lr_at(self, k: int) -> float:
        """The learning rate of optimizer step k (0-based): lr * min(1, (k + 1) / W), W = ppo.lr_warmup_steps
        (W = 0: lr throughout). A linear warm-up keeps Adam's first, full-size steps (|step| ~ lr per
        parameter whatever the gradient's scale) from throwing the ratio far outside the trust region."""
        w = self.pcfg.lr_warmup_steps
        return self.pcfg.lr * (min(1.0, (k + 1) / w) if w > 0 else 1.0)

    def _apply_gradients(self) -> tuple[torch.Tensor, bool]:
        """all_reduce, non-finite check (skip + count), clip, AdamW step, EMA. -> (grad_norm, stepped)."""
        distributed.all_reduce_grads(self.params)
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
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.optimizer_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self._version += 1
        if self.ema is not None:
            ema_update_(self.ema, self.policy, self.pcfg.ema_decay)
        return norm, True

    def update(self, cache) -> dict[str, float]:
        """PPO epochs x minibatches on ``cache`` (from ``rollout``) -> stats as floats.

        loss, kl and grad_norm are means over all minibatches. The trust-region diagnostics
        (``objective.RATIO_STATS``) are means over the off-policy minibatches only, those after the
        first optimizer step (the first one runs at r = 1 by construction); with one minibatch and one
        epoch there are none and they are not reported. ``top_step_share``/``top_step``: the DDIM step
        with the largest mean |l_t| over those minibatches, and its share of sum_t mean |l_t|.
        """
        if cache is not self.cache or self._rollout_version is None:
            raise ValueError("update(cache): the cache holds no valid rollout (not rolled out here, or its rewards were NaN/inf)")
        t0 = time.perf_counter()
        p = self.pcfg
        totals: dict[str, torch.Tensor] = defaultdict(float)
        ratio_totals: dict[str, torch.Tensor] = defaultdict(float)
        grad_norms, count = [], 0
        for epoch in range(p.num_epochs):
            seed = derive_seed(self.cfg.seed, self.num_updates, epoch, distributed.rank())
            minibatches = cache.minibatch_plan(seed, p.num_minibatches).to(self.device)
            steps = cache.timestep_plan(seed, self.steps_per_sample, self._trained).to(self.device)
            for rows in minibatches:
                for k, v in self.minibatch_gradient(rows, steps[rows]).items():
                    if k in RATIO_STATS:
                        if count > 0:
                            ratio_totals[k] = ratio_totals[k] + v
                    else:
                        totals[k] = totals[k] + v
                norm, _ = self._apply_gradients()
                grad_norms.append(norm)
                count += 1
        self.num_updates += 1
        stats = {k: float(v) / count for k, v in totals.items()}
        if count > 1:
            step_abs = ratio_totals.pop("step_abs_log_ratio")
            stats.update({k: float(v) / (count - 1) for k, v in ratio_totals.items()})
            stats["top_step_share"], stats["top_step"] = step_share(step_abs)
        stats["grad_norm"] = float(torch.stack(grad_norms).float().mean())
        stats["lr"] = self.lr_at(max(self.optimizer_steps - 1, 0))  # of the update's last optimizer step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats["time_update"] = time.perf_counter() - t0
        return stats

    def step(self, iteration: int) -> dict[str, float]:
        """One PPO iteration: rollout (seed from cfg.seed, iteration, rank), then update unless skipped."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with reward_step(iteration):  # plug-in rewards may ask for the iteration
            cache, stats = self.rollout(derive_seed(self.cfg.seed, iteration, distributed.rank()))
        if not stats["skipped"]:
            stats.update(self.update(cache))
        elapsed = stats["time_rollout"] + stats.get("time_update", 0.0)
        stats["samples_per_s"] = self.pcfg.batch_size * distributed.world() / max(elapsed, 1e-9)
        stats["peak_memory_mb"] = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        stats["skipped_batches"] = float(self.skipped_batches)
        stats["skipped_steps"] = float(self.skipped_steps)
        return stats

    # ------------------------------------------------------------------ eval / state

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, seed: int, policy: Optional[nn.Module] = None,
               class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_0 of the same DDIM plan from ``x_T`` [B, C, H, W]; step noise (and labels when the model is
        class-conditional and none are given) from a generator seeded by ``seed``."""
        policy = self.policy if policy is None else policy
        x = x_T.to(self.device, self.dtype)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if self.num_classes > 0 and class_labels is None:
            class_labels = torch.randint(0, self.num_classes, (x.shape[0],), generator=gen, device=self.device)
        draw = lambda i: torch.randn(x.shape, generator=gen, device=self.device, dtype=self.dtype)  # noqa: E731
        return ddim_loop(self.precision.bind(policy), self.plan, x, class_labels, noise=draw, step_fn=self.ops.ddim_step,
                         **self._kw())

    def state_dict(self) -> dict:
        """Policy, optimizer, EMA, reference, group tracker, counters (tensors/dicts/primitives only)."""
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ref_policy": self.ref_policy.state_dict() if self.ref_policy is not None else None,
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "counters": {"num_updates": self.num_updates, "optimizer_steps": self.optimizer_steps,
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
        self.num_updates = int(c["num_updates"])
        self.optimizer_steps = int(c.get("optimizer_steps", 0))  # absent before the lr warm-up existed
        self.skipped_batches, self.skipped_steps = int(c["skipped_batches"]), int(c["skipped_steps"])
        self.params_changed()
