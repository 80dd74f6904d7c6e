"""Built-in rewards, each ``f(x0 [B, 3, S, S] in [-1, 1], class_labels=None) -> [B]``.

- JPEG (DDPO, Black et al. 2023): each image quantised to uint8 (``ppo_ddpm.data.to_uint8``),
  encoded by PIL as JPEG quality 95; size_kB = bytes / 1000.
  compressibility r = -size_kB, incompressibility r = +size_kB.
- classifier: r = log p(y | x0) = log_softmax(logits)[y], y = target class (or the sample's label).
- random (the control of docs/objective.md): r ~ N(0, 1) drawn from a generator seeded by a hash of
  the uint8 image, so a deterministic function of the image that carries no information about it.
  Fine-tuning against it for the same budget measures how far the reward moves by drift alone.
- real-vs-fake model (``reward.model_output``): ``log_odds`` r = logit_real - logit_fake
  = log p(real | x0) - log p(fake | x0) (unbounded: a policy can push it far above any real image's
  score), or ``log_p_real`` r = log p(real | x0) = log sigmoid(logit_real - logit_fake) (bounded above
  by 0: once an image is judged real, there is nothing more to gain from it).
"""
from __future__ import annotations

import hashlib
import io
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import to_uint8
from .base import RewardError


def jpeg_size_kb(x0: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> JPEG file size in kB, float32 [B] on x0's device."""
    sizes = []
    for img in to_uint8(x0).numpy():
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=x0.device)


def jpeg_compressibility(x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r = -size_kB (smaller JPEG, higher reward)."""
    return -jpeg_size_kb(x0)


def jpeg_incompressibility(x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r = +size_kB (larger JPEG, higher reward)."""
    return jpeg_size_kb(x0)


def random_reward(x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r_b ~ N(0, 1), seeded by blake2b(uint8 image b): independent of anything the image shows."""
    values = []
    for img in to_uint8(x0).numpy():
        seed = int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little")
        values.append(np.random.default_rng(seed).standard_normal())
    return torch.tensor(values, dtype=torch.float32, device=x0.device)


def classifier_log_prob(model: nn.Module, target_class: int) -> Callable:
    """r = log_softmax(model(x0))[:, target_class]; ``target_class < 0``: the sample's class label."""

    def reward(x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        logp = torch.log_softmax(model(x0).float(), dim=-1)
        if target_class >= 0:
            return logp[:, target_class]
        if class_labels is None:
            raise RewardError("reward.target_class < 0 uses the samples' class labels, but none were given")
        return logp.gather(1, class_labels.long().view(-1, 1)).squeeze(1)

    return reward


def real_vs_fake_log_odds(model: nn.Module, real_class: int, fake_class: int) -> Callable:
    """r = logits[:, real_class] - logits[:, fake_class] = log p(real) - log p(fake)."""

    def reward(x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = model(x0).float()
        return logits[:, real_class] - logits[:, fake_class]

    return reward


def real_vs_fake_log_p_real(model: nn.Module, real_class: int, fake_class: int) -> Callable:
    """r = log p(real) = log sigmoid(logit_real - logit_fake), <= 0."""
    log_odds = real_vs_fake_log_odds(model, real_class, fake_class)

    def reward(x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.nn.functional.logsigmoid(log_odds(x0, class_labels))

    return reward
