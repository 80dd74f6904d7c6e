"""Rollout cache, advantage normalization and per-group stat tracker.

``RolloutCache``, ``GroupStatTracker`` and ``normalize_advantages`` are the C++ versions from
``ppo_ddpm._C`` when it is built (and ``PPO_DDPM_SKIP_EXT`` is not 1), else the pure-Python classes
below. The Python classes have the same API, maths, RNG and error messages, and are the reference the
tests compare the C++ against.

One rollout of B trajectories with T network calls is stored as

    states     [T, B, *sample_shape]    state_dtype (f32 | bf16); state i (i in [1, T], row i-1) =
                                        the action x_prev of call i-1 = the input of call i (shared,
                                        no copies). State 0, the start x_T, is not stored: its owner
                                        (the trainer) keeps it unrounded, so every pass reads it exactly
    log_probs  [T, B] f64               old log pi(x_{i+1} | x_i) (float64: a PPO log-ratio is the
                                        difference of two such totals, ~1e4 each at 3x32x32)
    timesteps  [T] i64, sigmas [T] f32  the DDIM schedule of the calls
    rewards    [B] f32, group_ids [B] i64, advantages [B] f32

Advantages use the population std (divide by N): A = (r - mean) / (std + eps), clamped to
[-adv_clip, adv_clip]. Index plans come from a splitmix64 stream and Fisher-Yates shuffles computed
on the host in 64-bit integers, so a seed gives the same plan on every platform and device.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import torch

_log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
# Seed salts so that the minibatch and the timestep plan of one seed use unrelated streams.
MINIBATCH_SALT = 0x6D696E6962617463  # "minibatc"
TIMESTEP_SALT = 0x74696D6573746570  # "timestep"


class SplitMix64:
    """splitmix64 (Steele, Lea, Flood 2014) in Python ints; ``below(n)`` is uniform on [0, n)."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Rejection sampling: draws below 2^64 mod n are redrawn, so r % n has no bias."""
        reject_below = (1 << 64) % n
        while True:
            r = self.next()
            if r >= reject_below:
                return r % n


def _partial_shuffle(rng: SplitMix64, a: list, k: int) -> None:
    """Forward Fisher-Yates: a[:k] becomes a uniformly ordered random k-subset of a."""
    n = len(a)
    for i in range(min(k, n - 1)):
        j = i + rng.below(n - i)
        a[i], a[j] = a[j], a[i]


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _check_int64(where: str, name: str, value: int) -> None:
    if not -(1 << 63) <= value < (1 << 63):
        raise TypeError(f"{where}: {name} must fit in int64, got {value}")


def _check_shape(where: str, name: str, t: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{where}: {name} has shape {_shape(t.shape)} but expected {_shape(expected)} ({meaning})")


def _check_floating(where: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating tensor, got {t.dtype}")


def _check_integer(where: str, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must be an integer tensor, got {t.dtype}")


def _check_device(where: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device} but the cache is on {device}")


def _check_index(where: str, i: int, lo: int, hi: int, what: str) -> None:
    if not lo <= i <= hi:
        raise IndexError(f"{where}: index i={i} out of range [{lo}, {hi}] ({what})")


def _states_what(T: int) -> str:
    return f"states 1..T for num_steps T={T}; state 0 (x_T) is not stored"


def _check_adv_args(where: str, eps: float, adv_clip: Optional[float]) -> None:
    if not eps >= 0.0:
        raise ValueError(f"{where}: eps must be >= 0, got {eps}")
    if adv_clip is not None and not adv_clip > 0.0:
        raise ValueError(f"{where}: adv_clip must be > 0 or None, got {adv_clip}")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Population mean and std, summed in index order in float64 (as the C++)."""
    s = 0.0
    for v in values:
        s += v
    mean = s / len(values)
    ss = 0.0
    for v in values:
        d = v - mean
        ss += d * d
    return mean, math.sqrt(ss / len(values))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _split_state_dict(where: str, d: dict) -> tuple[dict, dict, dict]:
    """Splits a state_dict into tensors, ints and int lists; anything else is a TypeError."""
    tensors, ints, lists = {}, {}, {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: state_dict keys must be str, got {type(key).__name__}")
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif _is_int(value):
            ints[key] = value
        elif isinstance(value, (list, tuple)) and all(_is_int(e) for e in value):
            lists[key] = [int(e) for e in value]
        else:
            raise TypeError(
                f"{where}: state_dict['{key}'] must be a tensor, an int or a list of ints, got {type(value).__name__}"
            )
    return tensors, ints, lists


def _reject_unexpected(where: str, got: dict, allowed: Sequence[str], kind: str) -> None:
    for key in sorted(got):
        if key not in allowed:
            raise ValueError(f"{where}: unexpected {kind} key '{key}' in state_dict")


def _require_key(where: str, got: dict, key: str, kind: str):
    if key not in got:
        raise ValueError(f"{where}: state_dict is missing {kind} key '{key}'")
    return got[key]


def _check_loaded(where: str, key: str, src: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> None:
    if tuple(src.shape) != tuple(shape):
        raise ValueError(f"{where}: state_dict['{key}'] has shape {_shape(src.shape)} but expected {_shape(shape)}")
    if src.dtype != dtype:
        raise TypeError(f"{where}: state_dict['{key}'] has dtype {src.dtype} but expected {dtype}")


def py_normalize_advantages(rewards: torch.Tensor, eps: float = 1e-6, adv_clip: Optional[float] = None) -> torch.Tensor:
    """A = (r - mean) / (std + eps), population std, in float64; clamp to [-adv_clip, adv_clip]. [B] -> [B] f32."""
    where = "normalize_advantages"
    _check_floating(where, "rewards", rewards)
    if rewards.dim() != 1 or rewards.numel() < 1:
        raise ValueError(f"{where}: rewards must have shape [B] with B >= 1, got {_shape(rewards.shape)}")
    _check_adv_args(where, eps, adv_clip)
    r = rewards.to(torch.float64)
    centered = r - r.mean()
    std = centered.pow(2).mean().sqrt()
    adv = centered / (std + eps)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    return adv.to(torch.float32)


class _Ring:
    __slots__ = ("slots", "count", "head")

    def __init__(self, buffer_size: int):
        self.slots = [0.0] * buffer_size
        self.count = 0
        self.head = 0


class PyGroupStatTracker:
    """Per-group ring buffer of the last ``buffer_size`` rewards (DDPO's per-prompt stat tracker).

    ``update(group_ids [N], rewards [N])``: A_n = (r_n - mean_g) / (std_g + eps) with the statistics of
    group g's buffer (rewards of earlier batches) together with this batch's rewards of group g, when
    those are >= ``min_count`` values, else with the batch-global ones; clamped to [-adv_clip, adv_clip].
    Then every reward (in index order) is pushed into its group's buffer. Returns [N] f32 on the
    rewards' device. (The current batch is always part of its own statistics, even when it is larger
    than the buffer.)
    """

    def __init__(self, buffer_size: int, min_count: int):
        if not buffer_size >= 1:
            raise ValueError(f"GroupStatTracker: buffer_size must be >= 1, got {buffer_size}")
        if not 0 <= min_count <= buffer_size:
            raise ValueError(f"GroupStatTracker: min_count must be in [0, buffer_size={buffer_size}], got {min_count}")
        self._buffer_size = int(buffer_size)
        self._min_count = int(min_count)
        self._groups: dict[int, _Ring] = {}

    @property
    def buffer_size(self) -> int:
        return self._buffer_size

    @property
    def min_count(self) -> int:
        return self._min_count

    def num_groups(self) -> int:
        return len(self._groups)

    def update(
        self, group_ids: torch.Tensor, rewards: torch.Tensor, eps: float = 1e-6, adv_clip: Optional[float] = None
    ) -> torch.Tensor:
        where = "GroupStatTracker.update"
        _check_integer(where, "group_ids", group_ids)
        _check_floating(where, "rewards", rewards)
        if rewards.dim() != 1 or rewards.numel() < 1:
            raise ValueError(f"{where}: rewards must have shape [N] with N >= 1, got {_shape(rewards.shape)}")
        _check_shape(where, "group_ids", group_ids, rewards.shape, "one group id per reward")
        _check_adv_args(where, eps, adv_clip)
        g = group_ids.to("cpu", torch.int64).tolist()
        r = rewards.to("cpu", torch.float64).tolist()
        values: dict[int, list[float]] = {}
        for gid, value in zip(g, r):
            if gid not in values:
                ring = self._groups.get(gid)
                values[gid] = [] if ring is None else ring.slots[: ring.count]
            values[gid].append(value)
        global_stats = _mean_std(r)
        stats = {gid: _mean_std(v) if len(v) >= self._min_count else global_stats for gid, v in values.items()}
        for gid, value in zip(g, r):
            ring = self._groups.setdefault(gid, _Ring(self._buffer_size))
            ring.slots[ring.head] = value
            ring.head = (ring.head + 1) % self._buffer_size
            ring.count = min(ring.count + 1, self._buffer_size)
        adv = []
        for gid, value in zip(g, r):
            mean, std = stats[gid]
            a = (value - mean) / (std + eps)
            if adv_clip is not None:
                a = min(max(a, -adv_clip), adv_clip)
            adv.append(a)
        return torch.tensor(adv, dtype=torch.float64).to(torch.float32).to(rewards.device)

    def state_dict(self) -> dict:
        """group_ids [G] i64 ascending, buffers [G, buffer_size] f64, counts [G] i64, heads [G] i64, ints."""
        ids = sorted(self._groups)
        rings = [self._groups[k] for k in ids]
        return {
            "buffers": torch.tensor([x.slots for x in rings], dtype=torch.float64).reshape(len(ids), self._buffer_size),
            "counts": torch.tensor([x.count for x in rings], dtype=torch.int64),
            "group_ids": torch.tensor(ids, dtype=torch.int64),
            "heads": torch.tensor([x.head for x in rings], dtype=torch.int64),
            "buffer_size": self._buffer_size,
            "min_count": self._min_count,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        where = "GroupStatTracker.load_state_dict"
        tensors, ints, lists = _split_state_dict(where, state_dict)
        _reject_unexpected(where, tensors, ("group_ids", "buffers", "counts", "heads"), "tensor")
        _reject_unexpected(where, ints, ("buffer_size", "min_count"), "int")
        _reject_unexpected(where, lists, (), "list")
        for key, own in (("buffer_size", self._buffer_size), ("min_count", self._min_count)):
            got = _require_key(where, ints, key, "int")
            if got != own:
                raise ValueError(f"{where}: state_dict['{key}']={got} but this tracker has {key}={own}")
        ids = _require_key(where, tensors, "group_ids", "tensor")
        if ids.dim() != 1:
            raise ValueError(f"{where}: state_dict['group_ids'] must have shape [G], got {_shape(ids.shape)}")
        G, bs = ids.shape[0], self._buffer_size
        spec = {"buffers": ((G, bs), torch.float64), "counts": ((G,), torch.int64),
                "group_ids": ((G,), torch.int64), "heads": ((G,), torch.int64)}
        host = {}
        for key, (shape, dtype) in spec.items():
            t = _require_key(where, tensors, key, "tensor")
            _check_loaded(where, key, t, shape, dtype)
            host[key] = t.cpu().tolist()
        groups = {}
        for k in range(G):
            count, head = host["counts"][k], host["heads"][k]
            if not 0 <= count <= bs:
                raise ValueError(f"{where}: state_dict['counts'][{k}]={count} not in [0, {bs}]")
            if not 0 <= head < bs:
                raise ValueError(f"{where}: state_dict['heads'][{k}]={head} not in [0, {bs - 1}]")
            gid = host["group_ids"][k]
            if gid in groups:
                raise ValueError(f"{where}: state_dict['group_ids'] has duplicate id {gid}")
            ring = _Ring(bs)
            ring.slots, ring.count, ring.head = list(host["buffers"][k]), count, head
            groups[gid] = ring
        self._groups = groups


class PyRolloutCache:
    """Preallocated storage of one rollout (see the module docstring for the tensors).

    ``record_state``/``record_logprob`` copy in place into the storage (no allocation, CUDA-graph
    capturable) and need inputs on the cache's device; the ``set_*`` setters and
    ``load_state_dict`` copy (casting) from any device.
    """

    def __init__(
        self,
        num_steps: int,
        batch_size: int,
        sample_shape: Sequence[int],
        state_dtype: torch.dtype = torch.float32,
        device="cpu",
    ):
        where = "RolloutCache"
        self._T, self._B = int(num_steps), int(batch_size)
        self._sample_shape = tuple(int(d) for d in sample_shape)
        if self._T < 1:
            raise ValueError(f"{where}: num_steps must be >= 1, got {self._T}")
        if self._B < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {self._B}")
        if any(d < 1 for d in self._sample_shape):
            raise ValueError(f"{where}: sample_shape entries must be >= 1, got {_shape(self._sample_shape)}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{where}: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        device = torch.device(device)
        T, B = self._T, self._B
        self._states = torch.zeros((T, B, *self._sample_shape), dtype=state_dtype, device=device)
        self._log_probs = torch.zeros((T, B), dtype=torch.float64, device=device)
        self._timesteps = torch.zeros((T,), dtype=torch.int64, device=device)
        self._sigmas = torch.zeros((T,), dtype=torch.float32, device=device)
        self._rewards = torch.zeros((B,), dtype=torch.float32, device=device)
        self._group_ids = torch.zeros((B,), dtype=torch.int64, device=device)
        self._advantages = torch.zeros((B,), dtype=torch.float32, device=device)

    states = property(lambda self: self._states)
    log_probs = property(lambda self: self._log_probs)
    timesteps = property(lambda self: self._timesteps)
    sigmas = property(lambda self: self._sigmas)
    rewards = property(lambda self: self._rewards)
    group_ids = property(lambda self: self._group_ids)
    advantages = property(lambda self: self._advantages)
    num_steps = property(lambda self: self._T)
    batch_size = property(lambda self: self._B)
    sample_shape = property(lambda self: self._sample_shape)
    state_dtype = property(lambda self: self._states.dtype)
    device = property(lambda self: self._states.device)

    def __repr__(self) -> str:
        return (f"RolloutCache(num_steps={self._T}, batch_size={self._B}, sample_shape={self._sample_shape}, "
                f"state_dtype={self.state_dtype}, device={self.device})")

    def record_state(self, i: int, x: torch.Tensor) -> None:
        """state i <- x (cast); i in [1, T], x [B, *sample_shape] on the cache's device."""
        where = "RolloutCache.record_state"
        _check_index(where, i, 1, self._T, _states_what(self._T))
        _check_floating(where, "x", x)
        _check_shape(where, "x", x, self._states.shape[1:], "[B, *sample_shape]")
        _check_device(where, "x", x, self.device)
        self._states[i - 1].copy_(x)

    def record_logprob(self, i: int, lp: torch.Tensor) -> None:
        """log_probs[i] <- lp (cast to f64); i in [0, T-1], lp [B] on the cache's device."""
        where = "RolloutCache.record_logprob"
        _check_index(where, i, 0, self._T - 1, f"num_steps T={self._T}")
        _check_floating(where, "lp", lp)
        _check_shape(where, "lp", lp, (self._B,), "[B]")
        _check_device(where, "lp", lp, self.device)
        self._log_probs[i].copy_(lp)

    def state(self, i: int) -> torch.Tensor:
        """View of state i = states[i - 1], i in [1, T]."""
        _check_index("RolloutCache.state", i, 1, self._T, _states_what(self._T))
        return self._states[i - 1]

    def set_schedule(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        where = "RolloutCache.set_schedule"
        _check_integer(where, "timesteps", timesteps)
        _check_floating(where, "sigmas", sigmas)
        _check_shape(where, "timesteps", timesteps, (self._T,), "[T]")
        _check_shape(where, "sigmas", sigmas, (self._T,), "[T]")
        self._timesteps.copy_(timesteps)
        self._sigmas.copy_(sigmas)

    def set_rewards(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
        where = "RolloutCache.set_rewards"
        _check_floating(where, "rewards", rewards)
        _check_integer(where, "group_ids", group_ids)
        _check_shape(where, "rewards", rewards, (self._B,), "[B]")
        _check_shape(where, "group_ids", group_ids, (self._B,), "[B]")
        self._rewards.copy_(rewards)
        self._group_ids.copy_(group_ids)

    def set_advantages(self, advantages: torch.Tensor) -> None:
        where = "RolloutCache.set_advantages"
        _check_floating(where, "advantages", advantages)
        _check_shape(where, "advantages", advantages, (self._B,), "[B]")
        self._advantages.copy_(advantages)

    def minibatch_plan(self, seed: int, num_minibatches: int) -> torch.Tensor:
        """[M, B/M] i64: a seeded permutation of 0..B-1 split into M minibatches (B % M == 0)."""
        where, B, M = "RolloutCache.minibatch_plan", self._B, num_minibatches
        _check_int64(where, "seed", seed)
        if not (M >= 1 and B % M == 0):
            raise ValueError(f"{where}: batch_size B={B} must be divisible by num_minibatches M={M} (M >= 1)")
        perm = list(range(B))
        _partial_shuffle(SplitMix64(seed ^ MINIBATCH_SALT), perm, B - 1)
        return torch.tensor(perm, dtype=torch.int64).view(M, B // M).to(self.device)

    def timestep_plan(self, seed: int, num_train_steps: int, steps: torch.Tensor) -> torch.Tensor:
        """[B, K] i64: row b = first K entries of an independent seeded permutation of ``steps``
        (1-D integer, distinct step indices in [0, T-1]: the trained steps)."""
        where, T, K = "RolloutCache.timestep_plan", self._T, num_train_steps
        _check_int64(where, "seed", seed)
        _check_integer(where, "steps", steps)
        if steps.dim() != 1 or steps.numel() < 1:
            raise ValueError(f"{where}: steps must have shape [P] with P >= 1, got {_shape(steps.shape)}")
        candidates = steps.to("cpu", torch.int64).tolist()
        for k, step in enumerate(candidates):
            if not 0 <= step < T:
                raise ValueError(f"{where}: steps[{k}]={step} out of range [0, {T - 1}]")
            if step in candidates[:k]:
                raise ValueError(f"{where}: steps has the step {step} twice")
        n = len(candidates)
        if not 1 <= K <= n:
            raise ValueError(f"{where}: num_train_steps K must be in [1, len(steps)={n}], got {K}")
        rng = SplitMix64(seed ^ TIMESTEP_SALT)
        rows = []
        for _ in range(self._B):
            row = list(candidates)
            _partial_shuffle(rng, row, K)
            rows.append(row[:K])
        return torch.tensor(rows, dtype=torch.int64).to(self.device)

    def _tensors(self) -> dict:
        return {"advantages": self._advantages, "group_ids": self._group_ids, "log_probs": self._log_probs,
                "rewards": self._rewards, "sigmas": self._sigmas, "states": self._states,
                "timesteps": self._timesteps}

    def nbytes(self) -> int:
        """Bytes of all owned storage."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def state_dict(self) -> dict:
        """The cache's own tensors (not copies) and num_steps, batch_size, sample_shape (list)."""
        return {**self._tensors(), "batch_size": self._B, "num_steps": self._T,
                "sample_shape": list(self._sample_shape)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Validates keys, shapes and dtypes, then copies (from any device) into the storage."""
        where = "RolloutCache.load_state_dict"
        tensors, ints, lists = _split_state_dict(where, state_dict)
        own = self._tensors()
        _reject_unexpected(where, tensors, tuple(own), "tensor")
        _reject_unexpected(where, ints, ("batch_size", "num_steps"), "int")
        _reject_unexpected(where, lists, ("sample_shape",), "list")
        for key, value in (("batch_size", self._B), ("num_steps", self._T)):
            got = _require_key(where, ints, key, "int")
            if got != value:
                raise ValueError(f"{where}: state_dict['{key}']={got} but this cache has {key}={value}")
        shape = _require_key(where, lists, "sample_shape", "list")
        if tuple(shape) != self._sample_shape:
            raise ValueError(f"{where}: state_dict['sample_shape']={_shape(shape)} but this cache has "
                             f"sample_shape={_shape(self._sample_shape)}")
        for key, dst in own.items():
            _check_loaded(where, key, _require_key(where, tensors, key, "tensor"), dst.shape, dst.dtype)
        for key, dst in own.items():
            dst.copy_(tensors[key])


def _load_extension():
    if os.environ.get("PPO_DDPM_SKIP_EXT", "0") == "1":
        _log.info("PPO_DDPM_SKIP_EXT=1: using the pure-Python rollout cache")
        return None
    try:
        from ppo_ddpm import _C
    except ImportError as e:
        _log.warning("ppo_ddpm._C is not built (%s); using the pure-Python rollout cache", e)
        return None
    return _C


_C = _load_extension()
HAS_EXTENSION = _C is not None
if HAS_EXTENSION:
    RolloutCache = _C.RolloutCache
    GroupStatTracker = _C.GroupStatTracker
    normalize_advantages = _C.normalize_advantages
else:
    RolloutCache = PyRolloutCache
    GroupStatTracker = PyGroupStatTracker
    normalize_advantages = py_normalize_advantages

__all__ = [
    "HAS_EXTENSION", "RolloutCache", "GroupStatTracker", "normalize_advantages",
    "PyRolloutCache", "PyGroupStatTracker", "py_normalize_advantages", "SplitMix64",
]
