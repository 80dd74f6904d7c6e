"""Rollout cache: the C++ extension against the pure-Python reference, and both against
independent references (float64 numpy advantages, a deque-based DDPO stat tracker, splitmix64 test
vectors, hand-computed byte counts)."""
import collections
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ppo_ddpm import rollout_cache as rc

needs_ext = pytest.mark.skipif(
    not rc.HAS_EXTENSION,
    reason="ppo_ddpm._C is not built (or PPO_DDPM_SKIP_EXT=1): C++ vs Python comparisons skipped",
)
IMPLS = ["py", pytest.param("cpp", marks=needs_ext)]
SEEDS = [0, 1, 12345, -7, 2**63 - 1]


def impl_api(impl):
    """(RolloutCache, GroupStatTracker, normalize_advantages) of one implementation."""
    if impl == "py":
        return rc.PyRolloutCache, rc.PyGroupStatTracker, rc.py_normalize_advantages
    return rc._C.RolloutCache, rc._C.GroupStatTracker, rc._C.normalize_advantages


def expected_nbytes(T, B, shape, dtype):
    d = int(np.prod(shape))
    state_bytes = 4 if dtype == torch.float32 else 2
    # states 1..T (x_T is not stored) + log_probs (f64) + timesteps + sigmas + rewards + group_ids + advantages
    return T * B * d * state_bytes + T * B * 8 + T * 8 + T * 4 + B * 4 + B * 8 + B * 4


def fill_cache(cache, gen, T, B, shape):
    for i in range(1, T + 1):
        cache.record_state(i, torch.randn((B, *shape), generator=gen, dtype=torch.float64))
    for i in range(T):
        cache.record_logprob(i, torch.randn(B, generator=gen))
    cache.set_schedule(torch.randint(0, 1000, (T,), generator=gen, dtype=torch.int32), torch.rand(T, generator=gen))
    cache.set_rewards(torch.randn(B, generator=gen), torch.randint(0, 3, (B,), generator=gen))
    cache.set_advantages(torch.randn(B, generator=gen, dtype=torch.float64))


# ---------------------------------------------------------------- RNG and plans


def test_splitmix64_reference_vector():
    # Published splitmix64 outputs for seed 1234567 (Vigna's reference implementation).
    rng = rc.SplitMix64(1234567)
    assert [rng.next() for _ in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821,
    ]


def test_below_is_uniform():
    rng = rc.SplitMix64(3)
    assert all(rng.below(1) == 0 for _ in range(10))
    counts = np.bincount([rng.below(6) for _ in range(12000)], minlength=6)
    assert counts.sum() == 12000 and np.all(np.abs(counts - 2000) < 200), counts


def step_sets(T, gen):
    """Candidate step sets of a T-step plan: all steps, a suffix, one step, a shuffled strict subset."""
    sets = [torch.arange(T), torch.arange(T // 2, T), torch.tensor([T - 1])]
    if T > 2:
        sets.append(torch.randperm(T, generator=gen)[: T - 1].to(torch.int32))  # any order, any integer dtype
    return sets


def fisher_yates_plan(seed, K, steps, B):
    """Independent reference of timestep_plan: one SplitMix64 stream seeded by seed ^ TIMESTEP_SALT; per
    row, a forward Fisher-Yates over a fresh copy of ``steps`` stopped after K swaps; keep the first K."""
    rng = rc.SplitMix64(seed ^ rc.TIMESTEP_SALT)
    rows = []
    for _ in range(B):
        row = [int(s) for s in steps]
        for i in range(min(K, len(row) - 1)):
            j = i + rng.below(len(row) - i)
            row[i], row[j] = row[j], row[i]
        rows.append(row[:K])
    return torch.tensor(rows, dtype=torch.int64)


@needs_ext
@pytest.mark.parametrize("B,T", [(1, 1), (6, 4), (12, 10), (48, 50)])
def test_plans_cpp_equal_python(B, T):
    cpp, py = rc._C.RolloutCache(T, B, (2,)), rc.PyRolloutCache(T, B, (2,))
    for seed in SEEDS:
        for M in [m for m in range(1, B + 1) if B % m == 0]:
            assert torch.equal(cpp.minibatch_plan(seed, M), py.minibatch_plan(seed, M)), (seed, M)
        for steps in step_sets(T, torch.Generator().manual_seed(T)):
            n = steps.numel()
            for K in {1, (n + 1) // 2, n}:
                plans = cpp.timestep_plan(seed, K, steps), py.timestep_plan(seed, K, steps)
                assert torch.equal(*plans), (seed, K, steps)
    steps = torch.arange(T)
    assert torch.equal(cpp.timestep_plan(5, T, steps), py.timestep_plan(seed=5, num_train_steps=T, steps=steps))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T", [(1, 1), (5, 4), (7, 12)])
def test_timestep_plan_equals_fisher_yates_reference(impl, B, T):
    """Row b = the first K entries of a seeded Fisher-Yates permutation of ``steps`` (as given, in order)."""
    cache = impl_api(impl)[0](T, B, (1,))
    for seed in SEEDS:
        for steps in step_sets(T, torch.Generator().manual_seed(seed & 0xFFFF)):
            for K in range(1, steps.numel() + 1):
                assert torch.equal(cache.timestep_plan(seed, K, steps), fisher_yates_plan(seed, K, steps.tolist(), B))
    # the positions drawn do not depend on the values: plan(steps) = steps[plan(0..P-1)]
    steps = torch.tensor([9, 2, 11, 5, 0])[: min(5, T)] % T
    if len(set(steps.tolist())) == steps.numel():
        positions = cache.timestep_plan(3, steps.numel(), torch.arange(steps.numel()))
        assert torch.equal(cache.timestep_plan(3, steps.numel(), steps), steps[positions])


@pytest.mark.parametrize("impl", IMPLS)
def test_plans_valid_and_deterministic(impl):
    Cache = impl_api(impl)[0]
    B, T = 12, 7
    cache = Cache(T, B, (1,))
    subset = torch.tensor([5, 2, 6])  # e.g. the stochastic steps of a plan, not contiguous
    for seed in SEEDS:
        plan = cache.minibatch_plan(seed, 3)
        assert plan.shape == (3, 4) and plan.dtype == torch.int64
        assert torch.equal(plan.flatten().sort().values, torch.arange(B))
        assert torch.equal(plan, cache.minibatch_plan(seed, 3))
        assert torch.equal(plan.flatten(), cache.minibatch_plan(seed, 1).flatten())  # M only reshapes
        steps = cache.timestep_plan(seed, 2, subset)
        assert steps.shape == (B, 2) and steps.dtype == torch.int64
        assert torch.equal(steps, cache.timestep_plan(seed, 2, subset))
        for row in steps.tolist():
            assert len(set(row)) == 2 and set(row) <= {5, 2, 6}
        full = cache.timestep_plan(seed, T, torch.arange(T))
        assert torch.equal(full.sort(dim=1).values, torch.arange(T).expand(B, T))
    assert not torch.equal(cache.minibatch_plan(0, 1), cache.minibatch_plan(1, 1))
    assert len({tuple(r) for r in cache.timestep_plan(0, T, torch.arange(T)).tolist()}) > 1  # rows are independent


@pytest.mark.parametrize("impl", IMPLS)
def test_timestep_plan_is_uniform(impl):
    cache = impl_api(impl)[0](6, 3000, (1,))
    plan = cache.timestep_plan(11, 2, torch.tensor([4, 1, 3, 5]))  # steps 1, 3, 4, 5 (0 and 2 excluded)
    first = np.bincount(plan[:, 0].numpy(), minlength=6)
    both = np.bincount(plan.flatten().numpy(), minlength=6)
    assert first[0] == first[2] == both[0] == both[2] == 0
    assert np.all(np.abs(first[[1, 3, 4, 5]] - 750) < 110), first
    assert np.all(np.abs(both[[1, 3, 4, 5]] - 1500) < 150), both


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_state_round_trip(impl, dtype):
    Cache = impl_api(impl)[0]
    T, B, shape = 4, 3, (3, 5, 2)
    cache = Cache(T, B, shape, dtype)
    assert cache.states.shape == (T, B, *shape) and cache.states.dtype == dtype  # states 1..T: no x_T
    assert cache.state_dtype == dtype and cache.device == torch.device("cpu")
    assert cache.num_steps == T and cache.batch_size == B and tuple(cache.sample_shape) == shape
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn((B, *shape), generator=gen, dtype=torch.float64) for _ in range(T)]  # states 1..T
    lps = [torch.randn(B, generator=gen, dtype=torch.float64) for _ in range(T)]
    for i, x in enumerate(xs, start=1):
        cache.record_state(i, x)
    for i, lp in enumerate(lps):
        cache.record_logprob(i, lp)
    for i, x in enumerate(xs, start=1):
        assert torch.equal(cache.state(i), x.to(dtype))
        assert torch.equal(cache.states[i - 1], x.to(dtype))  # row i-1: the action of call i-1
    assert cache.log_probs.dtype == torch.float64
    assert torch.equal(cache.log_probs, torch.stack(lps))  # float64 log-probs are stored exactly
    lp32 = torch.randn(B, generator=gen)
    cache.record_logprob(1, lp32)  # a float32 log-prob is widened exactly
    assert cache.log_probs.dtype == torch.float64 and torch.equal(cache.log_probs[1], lp32.double())
    # step i's action is step i+1's input: the same storage, written once
    cache.record_state(2, xs[0])
    assert torch.equal(cache.state(2), xs[0].to(dtype))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_cpp_equals_python(dtype, seed):
    T, B, shape = 3, 5, (2, 3, 3)
    caches = [rc._C.RolloutCache(T, B, shape, dtype), rc.PyRolloutCache(T, B, shape, dtype)]
    for cache in caches:
        fill_cache(cache, torch.Generator().manual_seed(seed), T, B, shape)
    sd_cpp, sd_py = (c.state_dict() for c in caches)
    assert sd_cpp.keys() == sd_py.keys()
    for key, value in sd_cpp.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == sd_py[key].dtype and torch.equal(value, sd_py[key]), key
        else:
            assert value == sd_py[key], key
    assert caches[0].nbytes() == caches[1].nbytes()
    assert repr(caches[0]) == repr(caches[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_setters_cast_and_store(impl):
    Cache = impl_api(impl)[0]
    cache = Cache(4, 3, (2,))
    cache.set_schedule(
        torch.tensor([750, 500, 250, 0], dtype=torch.int32), torch.tensor([0.5, 0.25, 0.125, 0.0], dtype=torch.float64)
    )
    assert cache.timesteps.dtype == torch.int64 and cache.timesteps.tolist() == [750, 500, 250, 0]
    assert cache.sigmas.dtype == torch.float32 and cache.sigmas.tolist() == [0.5, 0.25, 0.125, 0.0]
    cache.set_rewards(torch.tensor([1.5, -2.0, 0.25]), torch.tensor([7, 7, 2], dtype=torch.int16))
    assert cache.rewards.tolist() == [1.5, -2.0, 0.25] and cache.group_ids.tolist() == [7, 7, 2]
    cache.set_advantages(torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16))
    assert cache.advantages.dtype == torch.float32 and cache.advantages.tolist() == [0.5, -1.0, 2.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_recording_does_not_allocate(impl):
    Cache = impl_api(impl)[0]
    T, B, shape = 3, 2, (2, 4)
    cache = Cache(T, B, shape, torch.bfloat16)
    states_ptr, lp_ptr = cache.states.data_ptr(), cache.log_probs.data_ptr()
    row = B * int(np.prod(shape)) * cache.states.element_size()
    for i in range(1, T + 1):
        cache.record_state(i, torch.full((B, *shape), float(i)))
        view = cache.state(i)
        assert view.data_ptr() == states_ptr + (i - 1) * row  # a view into the preallocated storage
        assert view.untyped_storage().data_ptr() == cache.states.untyped_storage().data_ptr()
    for i in range(T):
        cache.record_logprob(i, torch.full((B,), -float(i)))
    assert cache.states.data_ptr() == states_ptr and cache.log_probs.data_ptr() == lp_ptr
    assert cache.states.untyped_storage().nbytes() == T * row  # T states, no duplicates, no x_T
    cache.state(2).fill_(9.0)  # the view writes through
    assert torch.all(cache.states[1] == 9.0)
    sd = cache.state_dict()
    assert sd["states"].data_ptr() == states_ptr  # state_dict holds the storage, not a copy


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,B,shape", [(1, 1, (1,)), (4, 3, (3, 5, 2)), (10, 8, (3, 8, 8))])
def test_nbytes(impl, dtype, T, B, shape):
    assert impl_api(impl)[0](T, B, shape, dtype).nbytes() == expected_nbytes(T, B, shape, dtype)


@pytest.mark.parametrize("src", IMPLS)
@pytest.mark.parametrize("dst", IMPLS)
def test_cache_state_dict_round_trip(src, dst):
    T, B, shape = 3, 4, (2, 2)
    a = impl_api(src)[0](T, B, shape, torch.bfloat16)
    fill_cache(a, torch.Generator().manual_seed(3), T, B, shape)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    b = impl_api(dst)[0](T, B, shape, torch.bfloat16)
    b.load_state_dict(loaded)
    for key, value in a.state_dict().items():
        other = b.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


# ---------------------------------------------------------------- advantages


def numpy_normalize(r, eps, clip):
    r = np.asarray(r, dtype=np.float64)
    adv = (r - r.mean()) / (r.std(ddof=0) + eps)
    return np.clip(adv, -clip, clip) if clip is not None else adv


class DequeTracker:
    """DDPO's per-prompt stat tracker written with deques and numpy (independent reference): the
    statistics of group g are those of (its deque before this batch) + (this batch's rewards of g),
    then the batch is appended."""

    def __init__(self, buffer_size, min_count):
        self.buffers = collections.defaultdict(lambda: collections.deque(maxlen=buffer_size))
        self.min_count = min_count

    def update(self, gids, rewards, eps=1e-6, clip=None):
        gids, rewards = np.asarray(gids), np.asarray(rewards, dtype=np.float64)
        out = np.empty_like(rewards)
        for g in np.unique(gids):
            values = np.concatenate([np.array(self.buffers[g], dtype=np.float64), rewards[gids == g]])
            mean, std = (values.mean(), values.std()) if len(values) >= self.min_count else (rewards.mean(), rewards.std())
            out[gids == g] = (rewards[gids == g] - mean) / (std + eps)
        for g, r in zip(gids, rewards):
            self.buffers[g].append(r)
        return np.clip(out, -clip, clip) if clip is not None else out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_normalize_advantages_vs_numpy(impl, n, clip):
    normalize = impl_api(impl)[2]
    for seed in range(3):
        r = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3 + 1
        adv = normalize(r, adv_clip=clip)
        assert adv.dtype == torch.float32 and adv.shape == (n,)
        np.testing.assert_allclose(adv.numpy(), numpy_normalize(r.numpy(), 1e-6, clip), rtol=1e-6, atol=1e-6)
    assert torch.equal(normalize(torch.full((4,), 2.5)), torch.zeros(4))  # zero std -> zero advantage
    assert torch.equal(normalize(torch.tensor([0.0, 2.0]), eps=0.0), torch.tensor([-1.0, 1.0]))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_normalize_advantages_cpp_equals_python(dtype):
    for seed in range(4):
        r = torch.randn(33, generator=torch.Generator().manual_seed(seed)).to(dtype)
        for kw in [{}, {"eps": 0.1}, {"adv_clip": 0.5}]:
            assert torch.equal(rc._C.normalize_advantages(r, **kw), rc.py_normalize_advantages(r, **kw))


def tracker_batches(seed, steps=5, n=10, groups=4):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, groups, (n,), generator=gen), torch.randn(n, generator=gen) * 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("buffer_size,min_count", [(3, 2), (4, 4), (16, 0), (5, 5)])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_group_tracker_vs_deque_reference(impl, buffer_size, min_count, clip):
    tracker = impl_api(impl)[1](buffer_size, min_count)
    ref = DequeTracker(buffer_size, min_count)
    for seed in range(2):
        for gids, rewards in tracker_batches(seed):
            adv = tracker.update(gids, rewards, adv_clip=clip)
            assert adv.dtype == torch.float32 and adv.shape == gids.shape
            expected = ref.update(gids.numpy(), rewards.numpy(), clip=clip)
            np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert tracker.num_groups() == len(ref.buffers)
    assert tracker.buffer_size == buffer_size and tracker.min_count == min_count


@pytest.mark.parametrize("impl", IMPLS)
def test_group_tracker_hand_computed(impl):
    tracker = impl_api(impl)[1](3, 2)
    # first batch: group 5's statistics are its four rewards of this batch (all of them, although its ring of
    # 3 then keeps only 2, 3, 4); group 9 has one value (< min_count): batch-global statistics
    adv = tracker.update(torch.tensor([5, 5, 9, 5, 5]), torch.tensor([1.0, 2.0, 10.0, 3.0, 4.0]), eps=0.0)
    g_mean, g_std = 4.0, np.sqrt(((np.array([1, 2, 10, 3, 4]) - 4.0) ** 2).mean())
    std5 = np.sqrt(1.25)  # population std of 1, 2, 3, 4 (mean 2.5)
    expected = [(1 - 2.5) / std5, (2 - 2.5) / std5, (10 - g_mean) / g_std, (3 - 2.5) / std5, (4 - 2.5) / std5]
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6)
    sd = tracker.state_dict()
    assert sd["group_ids"].tolist() == [5, 9] and sd["counts"].tolist() == [3, 1] and sd["heads"].tolist() == [1, 1]
    assert sd["buffers"].tolist() == [[4.0, 2.0, 3.0], [10.0, 0.0, 0.0]]
    # second batch: the rings before it (5: 2, 3, 4; 9: 10) together with this batch's rewards
    adv = tracker.update(torch.tensor([9, 5, 7]), torch.tensor([0.0, 7.0, 1.0]), eps=0.0)
    m5 = (2 + 3 + 4 + 7) / 4
    s5 = np.sqrt(((np.array([2, 3, 4, 7]) - m5) ** 2).mean())
    g_mean, g_std = 8 / 3, np.sqrt(((np.array([0, 7, 1]) - 8 / 3) ** 2).mean())  # group 7: one value -> global
    np.testing.assert_allclose(adv.numpy(), [(0 - 5) / 5, (7 - m5) / s5, (1 - g_mean) / g_std], rtol=1e-6)
    sd = tracker.state_dict()
    assert sd["group_ids"].tolist() == [5, 7, 9] and sd["counts"].tolist() == [3, 1, 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_group_tracker_batch_larger_than_buffer(impl):
    """64 rewards of one group and a buffer of 32: every sample is in its own statistics (all 64 of the
    batch, plus the buffer of earlier batches), not only the last 32 the ring keeps."""
    tracker, ref = impl_api(impl)[1](32, 16), DequeTracker(32, 16)
    gen = torch.Generator().manual_seed(0)
    ring = np.zeros(0)  # the last 32 rewards of earlier batches
    for step in range(3):
        rewards = torch.randn(64, generator=gen, dtype=torch.float64) * 2 + step
        gids = torch.zeros(64, dtype=torch.long)
        adv = tracker.update(gids, rewards, eps=0.0)
        values = np.concatenate([ring, rewards.numpy()])
        by_hand = (rewards.numpy() - values.mean()) / values.std()
        np.testing.assert_allclose(adv.numpy(), by_hand, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(adv.numpy(), ref.update(gids.numpy(), rewards.numpy(), eps=0.0), rtol=1e-5, atol=1e-6)
        if step == 0:  # the first batch normalises over itself: zero mean, unit std
            assert abs(float(adv.double().mean())) < 1e-6 and abs(float(adv.double().std(unbiased=False)) - 1) < 1e-6
        ring = rewards.numpy()[-32:]
    assert tracker.state_dict()["counts"].tolist() == [32]


@needs_ext
@pytest.mark.parametrize("buffer_size,min_count", [(3, 2), (8, 3)])
def test_group_tracker_cpp_equals_python(buffer_size, min_count):
    cpp, py = rc._C.GroupStatTracker(buffer_size, min_count), rc.PyGroupStatTracker(buffer_size, min_count)
    for gids, rewards in tracker_batches(7, steps=6, n=13, groups=5):
        for kw in [{}, {"adv_clip": 1.0, "eps": 1e-3}]:
            assert torch.equal(cpp.update(gids, rewards, **kw), py.update(gids, rewards, **kw))
    a, b = cpp.state_dict(), py.state_dict()
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("src", IMPLS)
@pytest.mark.parametrize("dst", IMPLS)
def test_group_tracker_resume_identical(src, dst):
    original = impl_api(src)[1](4, 2)
    batches = list(tracker_batches(1, steps=6))
    for gids, rewards in batches[:3]:
        original.update(gids, rewards)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    resumed = impl_api(dst)[1](4, 2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.num_groups() == original.num_groups()
    for gids, rewards in batches[3:]:
        assert torch.equal(original.update(gids, rewards), resumed.update(gids, rewards))


# ---------------------------------------------------------------- errors


def load_edited(Cache, drop=None, **changes):
    """Loads a T=2, B=2, sample_shape=(1,) cache's state_dict, edited, into a fresh such cache."""
    sd = {k: v for k, v in Cache(2, 2, (1,)).state_dict().items() if k != drop}
    Cache(2, 2, (1,)).load_state_dict({**sd, **changes})


BAD_CALLS = {
    "state index": (lambda C, G, N: C(3, 2, (4,)).state(4), IndexError,
                    r"RolloutCache.state: index i=4 out of range \[1, 3\]"),
    "state 0": (lambda C, G, N: C(3, 2, (4,)).state(0), IndexError,
                r"RolloutCache.state: index i=0 out of range \[1, 3\] \(states 1..T for num_steps T=3; "
                r"state 0 \(x_T\) is not stored\)"),
    "record state 0": (lambda C, G, N: C(3, 2, (4,)).record_state(0, torch.zeros(2, 4)), IndexError,
                       r"RolloutCache.record_state: index i=0 out of range \[1, 3\]"),
    "negative index": (lambda C, G, N: C(3, 2, (4,)).record_state(-1, torch.zeros(2, 4)), IndexError,
                       r"index i=-1"),
    "logprob index": (lambda C, G, N: C(3, 2, (4,)).record_logprob(3, torch.zeros(2)), IndexError,
                      r"out of range \[0, 2\]"),
    "state shape": (lambda C, G, N: C(3, 2, (4,)).record_state(1, torch.zeros(2, 5)), ValueError,
                    r"x has shape \[2, 5\] but expected \[2, 4\]"),
    "state dtype": (lambda C, G, N: C(3, 2, (4,)).record_state(1, torch.zeros(2, 4, dtype=torch.int64)), TypeError,
                    r"x must be a floating tensor, got torch.int64"),
    "logprob shape": (lambda C, G, N: C(3, 2, (4,)).record_logprob(0, torch.zeros(3)), ValueError,
                      r"lp has shape \[3\] but expected \[2\]"),
    "storage dtype": (lambda C, G, N: C(3, 2, (4,), torch.float16), TypeError,
                      r"state_dtype must be torch.float32 or torch.bfloat16, got torch.float16"),
    "num_steps": (lambda C, G, N: C(0, 2, (4,)), ValueError, r"num_steps must be >= 1, got 0"),
    "minibatches": (lambda C, G, N: C(3, 6, (4,)).minibatch_plan(0, 4), ValueError,
                    r"batch_size B=6 must be divisible by num_minibatches M=4"),
    "zero minibatches": (lambda C, G, N: C(3, 6, (4,)).minibatch_plan(0, 0), ValueError, r"num_minibatches M=0"),
    "train steps": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 3, torch.tensor([1, 2])), ValueError,
                    r"num_train_steps K must be in \[1, len\(steps\)=2\], got 3"),
    "zero train steps": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 0, torch.tensor([1, 2])), ValueError,
                         r"num_train_steps K must be in \[1, len\(steps\)=2\], got 0"),
    "step range": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 1, torch.tensor([0, 3])), ValueError,
                   r"steps\[1\]=3 out of range \[0, 2\]"),
    "negative step": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 1, torch.tensor([-1])), ValueError,
                      r"steps\[0\]=-1 out of range \[0, 2\]"),
    "repeated step": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 1, torch.tensor([2, 0, 2])), ValueError,
                      r"steps has the step 2 twice"),
    "steps dtype": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 1, torch.tensor([0.0, 1.0])), TypeError,
                    r"steps must be an integer tensor, got torch.float32"),
    "steps shape": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 1, torch.zeros(0, dtype=torch.long)), ValueError,
                    r"steps must have shape \[P\] with P >= 1, got \[0\]"),
    "steps 2-d": (lambda C, G, N: C(3, 6, (4,)).timestep_plan(0, 1, torch.zeros(1, 2, dtype=torch.long)), ValueError,
                  r"steps must have shape \[P\] with P >= 1, got \[1, 2\]"),
    "schedule dtype": (lambda C, G, N: C(2, 2, (1,)).set_schedule(torch.zeros(2), torch.zeros(2)), TypeError,
                       r"timesteps must be an integer tensor, got torch.float32"),
    "rewards shape": (lambda C, G, N: C(2, 2, (1,)).set_rewards(torch.zeros(3), torch.zeros(2, dtype=torch.long)),
                      ValueError, r"rewards has shape \[3\] but expected \[2\]"),
    "sd missing": (lambda C, G, N: load_edited(C, drop="sigmas"), ValueError,
                   r"state_dict is missing tensor key 'sigmas'"),
    "sd shape": (lambda C, G, N: load_edited(C, rewards=torch.zeros(3)), ValueError,
                 r"state_dict\['rewards'\] has shape \[3\] but expected \[2\]"),
    "sd dtype": (lambda C, G, N: load_edited(C, states=torch.zeros(2, 2, 1, dtype=torch.bfloat16)), TypeError,
                 r"state_dict\['states'\] has dtype torch.bfloat16 but expected torch.float32"),
    "sd num_steps": (lambda C, G, N: load_edited(C, num_steps=3), ValueError,
                     r"state_dict\['num_steps'\]=3 but this cache has num_steps=2"),
    "sd sample_shape": (lambda C, G, N: load_edited(C, sample_shape=[2]), ValueError,
                        r"state_dict\['sample_shape'\]=\[2\] but this cache has sample_shape=\[1\]"),
    "sd unexpected": (lambda C, G, N: load_edited(C, extra=torch.zeros(1)), ValueError,
                      r"unexpected tensor key 'extra'"),
    "sd value type": (lambda C, G, N: load_edited(C, num_steps="2"), TypeError,
                      r"state_dict\['num_steps'\] must be a tensor, an int or a list of ints, got str"),
    "normalize shape": (lambda C, G, N: N(torch.zeros(2, 2)), ValueError,
                        r"rewards must have shape \[B\] with B >= 1, got \[2, 2\]"),
    "normalize empty": (lambda C, G, N: N(torch.zeros(0)), ValueError, r"got \[0\]"),
    "normalize dtype": (lambda C, G, N: N(torch.zeros(3, dtype=torch.int64)), TypeError,
                        r"rewards must be a floating tensor"),
    "normalize clip": (lambda C, G, N: N(torch.zeros(3), adv_clip=0.0), ValueError, r"adv_clip must be > 0 or None"),
    "tracker min_count": (lambda C, G, N: G(4, 5), ValueError, r"min_count must be in \[0, buffer_size=4\], got 5"),
    "tracker ids shape": (lambda C, G, N: G(4, 2).update(torch.zeros(2, dtype=torch.long), torch.zeros(3)), ValueError,
                          r"group_ids has shape \[2\] but expected \[3\]"),
    "tracker ids dtype": (lambda C, G, N: G(4, 2).update(torch.zeros(3), torch.zeros(3)), TypeError,
                          r"group_ids must be an integer tensor, got torch.float32"),
    "tracker sd size": (lambda C, G, N: G(4, 2).load_state_dict(G(3, 2).state_dict()), ValueError,
                        r"state_dict\['buffer_size'\]=3 but this tracker has buffer_size=4"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_clear_errors(impl, name):
    call, exc, pattern = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        call(*impl_api(impl))


@needs_ext
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_errors_identical_in_cpp_and_python(name):
    call = BAD_CALLS[name][0]
    messages = []
    for impl in ["cpp", "py"]:
        with pytest.raises(Exception) as info:
            call(*impl_api(impl))
        messages.append((info.type, str(info.value)))
    if name == "normalize clip":  # C++ prints 0.0 as "0"
        messages = [(t, m.split(", got")[0]) for t, m in messages]
    assert messages[0] == messages[1]


def test_fallback_without_extension():
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from ppo_ddpm import rollout_cache as rc\n"
        "assert not rc.HAS_EXTENSION and rc.RolloutCache is rc.PyRolloutCache\n"
        "assert rc.GroupStatTracker is rc.PyGroupStatTracker\n"
        "assert rc.normalize_advantages is rc.py_normalize_advantages\n"
    )
    env = {**os.environ, "PPO_DDPM_SKIP_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pure-Python rollout cache" in out.stderr


def test_default_is_extension_when_built():
    if rc.HAS_EXTENSION:
        assert rc.RolloutCache is rc._C.RolloutCache
    else:
        assert rc.RolloutCache is rc.PyRolloutCache


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_storage_plans_and_graph_capture(impl, dtype):
    Cache = impl_api(impl)[0]
    T, B, shape = 3, 4, (3, 8, 8)
    cache = Cache(T, B, shape, dtype, "cuda")
    assert cache.states.is_cuda and cache.device.type == "cuda"
    cpu = Cache(T, B, shape, dtype, "cpu")
    plan = cache.minibatch_plan(5, 2)
    assert plan.is_cuda and torch.equal(plan.cpu(), cpu.minibatch_plan(5, 2))
    steps = torch.tensor([2, 0])
    assert torch.equal(cache.timestep_plan(5, 2, steps.cuda()).cpu(), cpu.timestep_plan(5, 2, steps))
    with pytest.raises(ValueError, match="is on cpu but the cache is on cuda"):
        cache.record_state(1, torch.zeros(B, *shape))

    x = torch.randn(B, *shape, device="cuda")
    lp = torch.randn(B, device="cuda", dtype=torch.float64)
    ptr = cache.states.data_ptr()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        cache.record_state(1, x)
        cache.record_logprob(1, lp)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.record_state(1, x)
        cache.record_logprob(1, lp)
    x.copy_(torch.randn_like(x))
    lp.copy_(torch.randn_like(lp))
    graph.replay()
    torch.cuda.synchronize()
    assert cache.states.data_ptr() == ptr
    assert torch.equal(cache.state(1), x.to(dtype)) and torch.equal(cache.log_probs[1], lp)
    assert cache.nbytes() == expected_nbytes(T, B, shape, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_advantages(impl):
    _, Tracker, normalize = impl_api(impl)
    r = torch.randn(16, generator=torch.Generator().manual_seed(0))
    adv = normalize(r.cuda(), adv_clip=2.0)
    assert adv.is_cuda
    torch.testing.assert_close(adv.cpu(), normalize(r, adv_clip=2.0), rtol=1e-6, atol=1e-6)
    gids = torch.arange(16) % 3
    a_gpu, a_cpu = Tracker(4, 2).update(gids.cuda(), r.cuda()), Tracker(4, 2).update(gids, r)
    assert a_gpu.is_cuda and torch.equal(a_gpu.cpu(), a_cpu)
