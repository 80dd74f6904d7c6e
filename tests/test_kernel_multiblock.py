"""The kernels' multi-block path as it runs on an H100/H200: under the split of a 132-SM GPU
(``_dispatch.emulate_sm_count``), B = 132 samples of D = 15360 elements are cut into 4 chunks per
sample, each program loops over 2 BLOCKs and the last chunk is ragged (1.5 BLOCKs). Each op, forward
and backward, runs in the interpreter (natively on a GPU) against float64 maths (the plain-PyTorch
references evaluated on float64 inputs) within the rounding bounds of ``kernel_checks``. On a GPU the
same tests also run at B = 64 x 3x256x256 with the device's own split (132 SMs: 9 chunks of 11 BLOCKs)."""
import contextlib

import pytest
import torch
from kernel_checks import assert_within_bound, ddim_step_bounds, gen, log_ratio_bounds, poison, randn, trajectory_bounds  # noqa: F401

from ppo_ddpm.ddpm.ddim import ddim_sigma
from ppo_ddpm.kernels import (
    _dispatch,
    ddim_step,
    ddim_step_reference,
    gaussian_log_ratio,
    gaussian_log_ratio_from_logprob,
    gaussian_log_ratio_from_logprob_reference,
    gaussian_log_ratio_reference,
    trajectory_ppo,
    trajectory_ppo_reference,
)

pytestmark = [pytest.mark.usefixtures("poison"),
              pytest.mark.skipif(not (_dispatch.HAS_TRITON and (torch.cuda.is_available() or _dispatch.INTERPRET)), reason="needs Triton")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
H100_SMS = 132
SHAPE = (132, 3, 80, 64)  # D = 15360 = 7.5 BLOCKs
CASES = [pytest.param(SHAPE, H100_SMS, id="B132-3x80x64-132sm"),
         pytest.param((64, 3, 256, 256), None, id="B64-3x256x256-device", marks=pytest.mark.cuda)]


def _split(num_sms):
    """The split of a num_sms-SM GPU, or the device's own (None)."""
    return _dispatch.emulate_sm_count(num_sms) if num_sms else contextlib.nullcontext()


def test_132_sm_split_loops_over_blocks_and_chunks():
    B, D = SHAPE[0], SHAPE[1] * SHAPE[2] * SHAPE[3]
    with _dispatch.emulate_sm_count(H100_SMS):
        sp = _dispatch.split(B, D, torch.device(DEV))
    assert sp == _dispatch.Split(nchunks=4, chunk_len=2 * _dispatch.BLOCK)
    assert B * sp.nchunks == _dispatch.PROGRAMS_PER_SM * H100_SMS and D - 3 * sp.chunk_len == 3 * _dispatch.BLOCK // 2  # ragged last chunk
    if DEV == "cpu":  # the interpreter's own split (8 programs) is one chunk of 8 BLOCKs: the multi-chunk path untested
        assert _dispatch.split(B, D, torch.device("cpu")) == _dispatch.Split(nchunks=1, chunk_len=8 * _dispatch.BLOCK)


def test_emulate_sm_count_nests_restores_and_checks():
    dev = torch.device("cpu")
    before = _dispatch.split(1, 10**6, dev)
    with _dispatch.emulate_sm_count(2):
        assert _dispatch.split(1, 10**6, dev).nchunks == 8
        with _dispatch.emulate_sm_count(132):
            assert _dispatch.split(1, 10**6, dev).nchunks == 489  # min(489 BLOCKs, 528 programs)
        assert _dispatch.split(1, 10**6, dev).nchunks == 8
    assert _dispatch.split(1, 10**6, dev) == before
    with pytest.raises(ValueError, match="num_sms"):
        with _dispatch.emulate_sm_count(0):
            pass


def _schedule(B, gen):
    a_t = 0.05 + 0.85 * torch.rand(B, generator=gen, dtype=torch.float64)
    a_p = a_t + (0.99 - a_t) * torch.rand(B, generator=gen, dtype=torch.float64)
    return [v.float().to(DEV) for v in (a_t, a_p, ddim_sigma(a_t, a_p, 1.0))]


def _ddim(fn, x_t, eps, coefs, z, score, grads, clip_x0, num_sms=None):
    """(x_prev, mean, log_prob, d eps) of fn for the cotangents ``grads`` (None where absent)."""
    eps = eps.clone().requires_grad_(True)
    with _split(num_sms):
        outs = fn(x_t, eps, *coefs, clip_x0=clip_x0, **({"x_prev": z} if score else {"noise": z}))
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if g is not None]
    (geps,) = torch.autograd.grad([o for o, _ in pairs], eps, [g for _, g in pairs])
    return (*outs, geps)


@pytest.mark.parametrize("shape,num_sms", CASES)
@pytest.mark.parametrize("score,dtype,clip_x0", [(False, torch.float32, 1.0), (True, torch.bfloat16, None)], ids=["sample-fp32-clip", "score-bf16"])
def test_ddim_step(score, dtype, clip_x0, shape, num_sms, gen):
    coefs = _schedule(shape[0], gen)
    x_t, eps = randn(shape, gen, dtype=dtype).to(DEV), randn(shape, gen, dtype=dtype).to(DEV)
    z = randn(shape, gen).to(DEV)
    if score:  # a cached action near the mean, in the state dtype
        z = ddim_step_reference(x_t.double(), eps.double(), *coefs, noise=z.double())[0].to(dtype)
    g_out = randn(shape, gen, dtype=dtype).to(DEV)
    grads = (None, g_out, randn(shape[:1], gen, 1e-3).to(DEV)) if score else (randn(shape, gen, dtype=dtype).to(DEV), g_out, None)
    out = _ddim(ddim_step, x_t, eps, coefs, z, score, grads, clip_x0, num_sms)
    exact = _ddim(ddim_step_reference, x_t.double(), eps.double(), coefs, z.double(), score, [None if g is None else g.double() for g in grads], clip_x0)
    bounds = ddim_step_bounds(x_t, eps, coefs[0], coefs[2], z, score, exact[:3], exact[3], grads, clip_x0)
    for name, o, e in zip(("x_prev", "mean", "log_prob", "d eps"), out, exact):
        assert_within_bound(name, o, e, bounds[name])


@pytest.mark.parametrize("shape,num_sms", CASES)
@pytest.mark.parametrize("from_logprob,dtype", [(False, torch.float32), (True, torch.float16)], ids=["mu_old-fp32", "from_logprob-fp16"])
def test_gaussian_log_ratio(from_logprob, dtype, shape, num_sms, gen):
    B = shape[0]
    sigma = (0.05 + 0.3 * torch.rand(B, generator=gen, dtype=torch.float64)).float().to(DEV)
    s = sigma.view(-1, 1, 1, 1).double().cpu()
    mo = randn(shape, gen)
    x = (mo + s * randn(shape, gen)).to(dtype).to(DEV)
    mn = (mo + 0.002 * s * randn(shape, gen)).to(dtype).to(DEV)
    if from_logprob:
        other = gaussian_log_ratio_from_logprob_reference(x.double(), mo.to(DEV), torch.zeros(B, dtype=torch.float64, device=DEV), sigma.double()).float()
        fn, ref = gaussian_log_ratio_from_logprob, gaussian_log_ratio_from_logprob_reference
    else:
        other = mo.to(dtype).to(DEV)
        fn, ref = gaussian_log_ratio, gaussian_log_ratio_reference
    g = randn((B,), gen).to(DEV)
    mn_k, mn_e = mn.clone().requires_grad_(True), mn.double().requires_grad_(True)
    with _split(num_sms):
        out = fn(x, mn_k, other, sigma)
    exact = ref(x.double(), mn_e, other.double(), sigma.double())
    (grad,) = torch.autograd.grad(out, mn_k, g)
    (exact_grad,) = torch.autograd.grad(exact, mn_e, g.double())
    bounds = log_ratio_bounds(x, mn, other, sigma, exact, exact_grad, g, from_logprob=from_logprob)
    assert_within_bound("log_ratio", out, exact, bounds["log_ratio"])
    assert_within_bound("d mu_new", grad, exact_grad, bounds["d mu_new"])


def test_trajectory_ppo_several_programs_and_tiles(gen):
    """T = 100, B = 600: 3 programs of 256 samples, each over 7 tiles of 16 steps (both ragged); its launch
    does not depend on the SM count."""
    l, adv = randn((100, 600), gen, 0.01).to(DEV), randn((600,), gen).to(DEV)
    settings = dict(clip_range=0.2, per_step_clip=0.03, global_clip=0.2)
    with _dispatch.emulate_sm_count(H100_SMS):
        out = trajectory_ppo(l, adv, **settings)
    ref = trajectory_ppo_reference(l.double(), adv.double(), **settings)
    assert torch.equal(out.mask, ref.mask) and 0 < out.mask.sum() < 600
    bounds = trajectory_bounds(l, adv, ref.loss, ref.log_ratio, ref.weights, ref.stats, settings["per_step_clip"])
    for name in ("loss", "log_ratio", "weights"):
        assert_within_bound(name, getattr(out, name), getattr(ref, name), bounds[name])
    for k, v in ref.stats.items():
        assert_within_bound(k, out.stats[k], v, bounds[k])
