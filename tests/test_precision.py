"""ppo.precision / tf32 / channels_last (``ppo/precision.py``) on the CPU: bf16 autocast of the UNet (CPU
autocast supports bf16), the gradient's error bound, log r = 0 where the trainer promises it, the CUDA-only
options as no-ops on the CPU, and the bf16 config rule.

The bound of ``test_bf16_gradient_within_the_derived_bound_of_fp32``. Same actions, same parameters, each
precision with the old log-probs its own rollout records for these actions (so r = 1 under both and the
weights -A_b / B are the same), the with-grad pass run once with the fp32 UNet and once with the bf16 one.
At r = 1 the gradient is

    g = sum_{b,t} w_b J_{b,t}^T c_{b,t},   c_{b,t} = d l_{b,t} / d mu = (a_{b,t} - mu_{b,t}) / s_t^2

(J: the UNet's Jacobian through the DDIM mean). bf16 moves it in two ways, to first order:

1. J^T c is computed with bf16 operands: each of the L bf16 ops (conv, linear, attention matmul) rounds its
   two inputs to 8 significant bits (relative error <= u = 2^-8 each), forward and backward; a weight's
   gradient is (forward activation) x (cotangent), whose errors add up along at most L ops, so
   ||delta(J^T c)|| <= 2 u L ||J^T c|| in the norm-wise model (no cancellation inside a layer);
2. the cotangent itself: a - mu_bf16 = (a - mu_fp32) - delta mu, so ||delta c|| / ||c|| = rho with
   rho = max_t ||mu_bf16 - mu_fp32|| / ||a - mu_fp32||, measured here on the test's own inputs.

Hence ||g_bf16 - g_fp32|| / ||g_fp32|| <= 2 u L + rho =: eps, and cos(g_bf16, g_fp32) >= sqrt(1 - eps^2).
L counts every Conv2d / Linear module and the two matmuls of each attention block (an upper bound on the
depth). The sampler is run at s_t >= 0.5 (``sample_at_floor``), where a - mu = s z is large against the bf16
mean error, so rho is small; at small s_t the same mean error dominates the cotangent (README, "Precision").
Here L = 51, rho ~ 0.007, eps = 0.41 (cos >= 0.91); measured over 4 seeds: rel 0.10 .. 0.19, cos >= 0.982.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from ppo_ddpm.config import Config, ConfigError, validate_config
from ppo_ddpm.ddpm.ddim import ddim_step_reference
from ppo_ddpm.ddpm.model import build_model
from ppo_ddpm.ddpm.unet import AttnBlock
from ppo_ddpm.ppo import PPOTrainer
from ppo_ddpm.ppo.precision import UNetPrecision

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def mean_pixel(x0, labels=None):
    return x0.float().mean((1, 2, 3))


def unet_config(precision: str = "fp32", **ppo) -> Config:
    """The embedded default's UNet (3x16x16, 0.7M parameters) on 4 DDIM steps, B = 6, one micro-batch."""
    cfg = Config()
    cfg.sampling.num_inference_steps = 4
    cfg.ppo.batch_size = cfg.ppo.microbatch = 6
    cfg.ppo.num_epochs = cfg.ppo.num_minibatches = 1
    cfg.ppo.use_kernels = False
    cfg.ppo.precision = precision
    for k, v in ppo.items():
        setattr(cfg.ppo, k, v)
    return cfg


def make_trainer(cfg: Config, seed: int = 0) -> PPOTrainer:
    torch.manual_seed(seed)
    return PPOTrainer(cfg, build_model(cfg.model), mean_pixel, "cpu")


def grads(trainer) -> torch.Tensor:
    return torch.cat([q.grad.reshape(-1) for q in trainer.params])


def bf16_ops(model) -> int:
    """L: the ops autocast runs in bf16 (Conv2d, Linear, two matmuls per attention block)."""
    mods = list(model.modules())
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in mods) + 2 * sum(isinstance(m, AttnBlock) for m in mods)


def cotangent_error(trainer, bf16: UNetPrecision, fp32: UNetPrecision) -> float:
    """rho = max over the trained steps of ||mu_bf16 - mu_fp32|| / ||a - mu_fp32|| on the cache's samples."""
    plan, kw = trainer.plan, trainer._kw()
    rho = 0.0
    with torch.no_grad():
        for i in trainer.trained_steps:
            x, a = trainer.state(i).float(), trainer.state(i + 1).float()
            t, *coefs = plan.step(i, x.shape[0])
            mu = {run: ddim_step_reference(x, run.forward(trainer.policy, x, t, None), *coefs, x_prev=a, **kw)[1]
                  for run in (bf16, fp32)}
            rho = max(rho, float((mu[bf16] - mu[fp32]).norm() / (a - mu[fp32]).norm()))
    return rho


def rescore_old_log_probs(trainer) -> None:
    """Replace the cache's old log-probs by those of the trainer's current forward (precision) for the same
    actions: what a rollout under that precision records for them."""
    trainer.params_changed()  # force the ratio pass: l = logp_now - logp_old
    steps = trainer.trained_steps
    trainer.cache.log_probs[steps] += trainer.ratio_pass(torch.arange(trainer.pcfg.batch_size))


@pytest.mark.parametrize("objective", ["trajectory", "per_step"])
def test_bf16_gradient_within_the_derived_bound_of_fp32(objective):
    cfg = unet_config(objective=objective, sigma_floor=0.5, sample_at_floor=True, kl_beta=0.1)
    trainer = make_trainer(cfg)
    assert float(trainer.plan.sigma.min()) >= 0.5
    trainer.rollout(seed=1)  # fp32 rollout: the actions both gradients are taken on
    rows = torch.arange(cfg.ppo.batch_size)
    steps = trainer.cache.timestep_plan(2, trainer.steps_per_sample, torch.tensor(trainer.trained_steps))
    fp32, bf16 = trainer.precision, UNetPrecision("cpu", torch.bfloat16)
    g = {}
    for run in (fp32, bf16):
        trainer.precision = run
        rescore_old_log_probs(trainer)  # as this precision's rollout records them: r = 1 under it
        assert bool((trainer.ratio_pass(rows) == 0).all())
        trainer.minibatch_gradient(rows, steps)
        g[run] = grads(trainer)
    rel = float((g[bf16] - g[fp32]).norm() / g[fp32].norm())
    cos = float(torch.nn.functional.cosine_similarity(g[bf16], g[fp32], dim=0))
    L, rho = bf16_ops(trainer.policy), cotangent_error(trainer, bf16, fp32)
    eps = 2 * U_BF16 * L + rho
    print(f"bf16 vs fp32 gradient: rel {rel:.4f}, cos {cos:.5f}; bound eps = 2uL + rho = {eps:.4f} (L = {L}, rho = {rho:.4f})")
    assert L == 51 and rho < 0.05 and eps < 1, (L, rho)
    assert rel <= eps and cos >= math.sqrt(1 - eps**2), (rel, cos, eps)
    # the bf16 path really ran: the difference is far above fp32 rounding (2^-24) and of bf16's order
    assert rel > U_BF16 / 4, rel


def test_bf16_log_ratio_is_zero_where_the_trainer_promises_it():
    """The version skip gives log r = 0 without a forward; a ratio pass forced at the rollout's parameters
    over the rollout's batch (same rows, same order: the same autocast forward) gives exactly 0 as well, and
    the gradient is the same either way."""
    trainer = make_trainer(unet_config("bf16", kl_beta=0.1))
    assert trainer.precision.autocast == torch.bfloat16
    cache, _ = trainer.rollout(seed=3)
    B = trainer.pcfg.batch_size
    rows, steps = torch.arange(B), cache.timestep_plan(1, trainer.steps_per_sample, torch.tensor(trainer.trained_steps))
    assert bool((trainer.ratio_pass(rows) == 0).all())
    trainer.minibatch_gradient(rows, steps)
    g_skip = grads(trainer)
    trainer.params_changed()  # same parameters, the ratio pass runs
    run = trainer.ratio_pass(rows)
    assert run.shape == (trainer.n_train, B) and bool((run == 0).all()), run
    trainer.minibatch_gradient(rows, steps)
    assert torch.equal(grads(trainer), g_skip)


def test_channels_last_and_tf32_do_nothing_on_cpu():
    """Both are CUDA options: on the CPU a trainer with them on gives the same rollout and gradient, bit for bit."""
    out = []
    for on in (False, True):
        trainer = make_trainer(unet_config(channels_last=on, tf32=on))
        assert trainer.precision == UNetPrecision("cpu")
        assert all(q.is_contiguous() for q in trainer.policy.parameters())
        cache, _ = trainer.rollout(seed=4)
        trainer.params_changed()
        rows = torch.arange(trainer.pcfg.batch_size)
        trainer.minibatch_gradient(rows, cache.timestep_plan(0, trainer.steps_per_sample, torch.tensor(trainer.trained_steps)))
        out.append((cache.states.clone(), cache.log_probs.clone(), grads(trainer)))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_cuda_options_take_effect_only_on_cuda():
    cfg = unet_config("bf16", tf32=True, channels_last=True)
    assert UNetPrecision.from_config(cfg.ppo, "cpu") == UNetPrecision("cpu", torch.bfloat16)
    cuda = UNetPrecision.from_config(cfg.ppo, "cuda")  # (a torch.device needs no GPU)
    assert cuda == UNetPrecision("cuda", torch.bfloat16, tf32=True, channels_last=True)
    # backend() sets both TF32 switches as configured and restores them (the flags exist on CPU builds)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    for tf32 in (True, False):
        with UNetPrecision("cuda", tf32=tf32).backend():
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (tf32, tf32)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before
    model = torch.nn.Conv2d(3, 4, 3)
    cuda.prepare(model, None)
    assert model.weight.is_contiguous(memory_format=torch.channels_last)


def test_forward_returns_the_input_dtype_contiguous():
    """bf16: the UNet output comes back in the policy dtype (the DDIM step and log-probs never see bf16)."""
    torch.manual_seed(0)
    model = build_model(Config().model).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([900, 10])
    with torch.no_grad():
        eps16 = UNetPrecision("cpu", torch.bfloat16).forward(model, x, t, None)
        eps32 = UNetPrecision("cpu").forward(model, x, t, None)
        assert torch.equal(eps32, model(x, t))
    assert eps16.dtype == eps32.dtype == torch.float32 and eps16.is_contiguous()
    rel = float((eps16 - eps32).norm() / eps32.norm())
    assert U_BF16 / 16 < rel < 2 * U_BF16 * bf16_ops(model), rel


def test_bf16_needs_a_gpu_with_bfloat16(monkeypatch):
    cfg = unet_config("bf16")
    cfg.device = "cpu"
    validate_config(cfg)  # CPU autocast has bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    bad = copy.deepcopy(cfg)
    bad.device = "cuda"
    with pytest.raises(ConfigError, match=r"ppo.precision bf16 needs a GPU with bfloat16 support .* Tesla V100"):
        validate_config(bad)
    bad.ppo.precision = "fp32"
    validate_config(bad)
