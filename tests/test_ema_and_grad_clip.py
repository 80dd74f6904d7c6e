"""The optimizer step around the PPO gradient, against hand computations in float64:

- ``ema_update_`` (pretraining and the trainer): ema <- d ema + (1 - d) model, buffers copied;
- the trainer's EMA after one update equals that formula on the policy before and after;
- ``ppo.grad_clip``: the gradient AdamW sees has norm min(||g||, clip), and the parameters after two
  optimizer steps equal AdamW (written out below) on the clipped gradients g * min(1, clip / (||g|| + 1e-6)).
  Two steps: Adam's first step is lr * g / |g| whatever the scale of g, the second is not;
- ``ppo.lr_warmup_steps`` = W: optimizer step k runs at lr_k = lr * min(1, (k + 1) / W), checked the
  same way (AdamW by hand with lr_k, weight decay included) over four steps, and across a checkpoint.
"""
import math

import pytest
import torch
from torch import nn

from ppo_ddpm.ppo import PPOTrainer
from ppo_ddpm.utils.ema import ema_update_
from test_trainer_grad import TinyEps, brightness, tiny_config


def _flat(ps):
    return torch.cat([p.detach().reshape(-1).double() for p in ps])


def test_ema_update_is_decay_times_ema_plus_rest_times_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # running stats: buffers that differ from a fresh copy's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = [p.detach().double().clone() for p in ema.parameters()]
    ema_update_(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        assert not torch.allclose(b, m.double())  # a flipped weight (0.1 ema + 0.9 model) would show
        torch.testing.assert_close(e.double(), 0.9 * b + 0.1 * m.double(), rtol=1e-6, atol=1e-7)
    for e, m in zip(ema.buffers(), model.buffers()):
        assert torch.equal(e, m)
    with pytest.raises(ValueError, match="parameters"):
        ema_update_(nn.Linear(3, 4), model, 0.9)


def test_trainer_ema_follows_the_policy_by_the_formula():
    torch.manual_seed(0)
    decay = 0.75
    trainer = PPOTrainer(tiny_config(ema_decay=decay, lr=1e-2), TinyEps().double(), brightness, "cpu")
    ema_before = _flat(trainer.ema.parameters())
    policy_before = _flat(trainer.policy.parameters())
    assert torch.equal(ema_before, policy_before)
    trainer.step(0)  # one epoch, one minibatch: one optimizer step
    policy_after = _flat(trainer.policy.parameters())
    assert not torch.allclose(policy_after, policy_before)
    torch.testing.assert_close(_flat(trainer.ema.parameters()), decay * ema_before + (1 - decay) * policy_after,
                               rtol=1e-12, atol=1e-14)


def _adamw_by_hand(p, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.AdamW (decoupled weight decay, bias-corrected moments) written out, float64; ``lr`` a
    number or one per step."""
    b1, b2 = betas
    lrs = lr if isinstance(lr, (list, tuple)) else [lr] * len(grads)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for k, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    return p


def test_grad_clip_is_applied_before_adamw():
    torch.manual_seed(0)
    clip, lr, wd = 0.5, 1e-6, 0.1  # a small step keeps the second minibatch's ratios unclipped (gradient != 0)
    trainer = PPOTrainer(tiny_config(num_minibatches=2, grad_clip=clip, lr=lr, weight_decay=wd),
                         TinyEps().double(), brightness, "cpu")
    params = trainer.params
    p0 = _flat(params)
    latest, raw, seen = {}, [], []
    for i, p in enumerate(params):  # the accumulated (raw) gradient of the minibatch, before any clipping
        p.register_post_accumulate_grad_hook(lambda q, i=i: latest.__setitem__(i, q.grad.detach().clone()))

    def before_step(optimizer, args, kwargs):
        raw.append(torch.cat([latest[i].reshape(-1) for i in range(len(params))]))
        seen.append(_flat(p.grad for p in params))

    trainer.optimizer.register_step_pre_hook(before_step)
    stats = trainer.step(0)
    assert len(raw) == 2  # two minibatches, two optimizer steps

    clipped = []
    for g, g_seen in zip(raw, seen):
        norm = g.norm().item()
        assert norm > 2 * clip  # the clip is active
        c = g * min(1.0, clip / (norm + 1e-6))
        assert math.isclose(c.norm().item(), min(norm, clip), rel_tol=1e-4)
        torch.testing.assert_close(g_seen, c, rtol=1e-12, atol=1e-18)  # what AdamW got
        clipped.append(c)
    assert stats["grad_norm"] == pytest.approx(sum(g.norm().item() for g in raw) / 2, rel=1e-6)  # before clipping (a float32 stat)
    update = _flat(params) - p0
    torch.testing.assert_close(update, _adamw_by_hand(p0, clipped, lr, wd) - p0, rtol=1e-8, atol=1e-16)
    unclipped = _adamw_by_hand(p0, raw, lr, wd) - p0
    assert (update - unclipped).abs().max() > 0.01 * lr  # clipping changed the second Adam step


def test_grad_clip_off_passes_the_gradient_through():
    torch.manual_seed(0)
    trainer = PPOTrainer(tiny_config(grad_clip=None, lr=1e-2), TinyEps().double(), brightness, "cpu")
    p0 = _flat(trainer.params)
    grads = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append(_flat(p.grad for p in trainer.params)))
    trainer.step(0)
    assert len(grads) == 1 and grads[0].norm() > 1.0  # the default clip (1.0) would have scaled it
    torch.testing.assert_close(_flat(trainer.params) - p0, _adamw_by_hand(p0, grads, 1e-2, 0.0) - p0, rtol=1e-8, atol=1e-16)


def test_lr_warmup_is_linear_in_the_optimizer_steps_and_survives_a_checkpoint():
    torch.manual_seed(0)
    lr, wd, warmup = 1e-3, 0.1, 3
    cfg = tiny_config(num_minibatches=2, lr=lr, weight_decay=wd, lr_warmup_steps=warmup)
    trainer = PPOTrainer(cfg, TinyEps().double(), brightness, "cpu")
    p0 = _flat(trainer.params)
    grads = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append(_flat(p.grad for p in trainer.params)))
    assert trainer.step(0)["lr"] == pytest.approx(2 * lr / 3, rel=1e-12)  # steps 0, 1: lr/3, 2 lr/3
    state = trainer.state_dict()
    resumed = PPOTrainer(cfg, TinyEps().double(), brightness, "cpu")
    resumed.load_state_dict(state)
    assert resumed.optimizer_steps == 2 and resumed.lr_at(2) == lr
    resumed.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append(_flat(p.grad for p in resumed.params)))
    assert resumed.step(1)["lr"] == lr
    lrs = [lr * min(1.0, (k + 1) / warmup) for k in range(4)]
    assert len(grads) == 4 and lrs[:3] == [lr / 3, 2 * lr / 3, lr]
    torch.testing.assert_close(_flat(resumed.params) - p0, _adamw_by_hand(p0, grads, lrs, wd) - p0, rtol=1e-8, atol=1e-16)
    without = _adamw_by_hand(p0, grads, lr, wd) - p0
    assert ((_flat(resumed.params) - p0) - without).abs().max() > 0.1 * lr  # the warm-up changed the steps
