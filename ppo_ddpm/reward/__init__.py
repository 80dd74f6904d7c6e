"""Frozen rewards of x_0: built-in (JPEG, classifier, real-vs-fake CNN) or plug-in.

    reward_fn = build_reward(cfg.reward, device)
    r = reward_fn(x0, class_labels)              # [B] float32 on x0's device, no grad
    r, finite = check_reward(r, B, reward_fn.name)  # trainer: skip the batch if not finite.all()

``cfg.reward.kind``:

- ``model``: the RewardCNN at ``model_path`` (trained by ``python -m ppo_ddpm.train_reward_model``):
  log-odds of "real", logit_real - logit_fake, or log p(real) (``model_output``);
- ``classifier``: log p(target_class | x0) of the RewardCNN at ``model_path``
  (``target_class < 0``: the class label of each sample);
- ``jpeg_compressibility`` / ``jpeg_incompressibility``: -/+ JPEG (q95) size in kB (DDPO);
- ``random``: N(0, 1) seeded by the image's bytes, the random-reward control;
- ``plugin``: ``function = "module:function"``.
"""
from __future__ import annotations

import torch

from .base import RewardError, RewardFn, check_reward, freeze
from .builtin import (
    classifier_log_prob,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
    random_reward,
    real_vs_fake_log_odds,
    real_vs_fake_log_p_real,
)
from .model import CLASS_NAMES, RewardCNN, load_reward_model, save_reward_model
from .plugin import load_plugin

__all__ = [
    "CLASS_NAMES", "RewardCNN", "RewardError", "RewardFn", "build_reward", "check_reward",
    "classifier_log_prob", "freeze", "jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb",
    "load_plugin", "load_reward_model", "random_reward", "real_vs_fake_log_odds", "real_vs_fake_log_p_real", "save_reward_model",
]


def _load_frozen(reward_cfg, device: torch.device) -> tuple[RewardCNN, dict]:
    if not reward_cfg.model_path:
        raise RewardError(
            f"reward.kind={reward_cfg.kind!r} needs reward.model_path (a reward CNN written by "
            "`python -m ppo_ddpm.train_reward_model`), but it is empty"
        )
    model, meta = load_reward_model(reward_cfg.model_path, device)
    return freeze(model), meta


def build_reward(reward_cfg, device: str | torch.device = "cpu") -> RewardFn:
    """``cfg.reward`` -> a frozen :class:`RewardFn`; models are loaded onto ``device``."""
    device = torch.device(device)
    kind = reward_cfg.kind
    if kind == "jpeg_compressibility":
        return RewardFn(jpeg_compressibility, kind)
    if kind == "jpeg_incompressibility":
        return RewardFn(jpeg_incompressibility, kind)
    if kind == "random":
        return RewardFn(random_reward, kind)
    if kind == "plugin":
        fn, takes_labels = load_plugin(reward_cfg.function)
        return RewardFn(fn, f"plugin {reward_cfg.function}", pass_labels=takes_labels)
    if kind == "model":
        model, meta = _load_frozen(reward_cfg, device)
        names = meta["class_names"]
        if "real" not in names or "fake" not in names:
            raise RewardError(f"reward model {reward_cfg.model_path} has classes {names}, expected 'real' and 'fake'")
        make = real_vs_fake_log_p_real if reward_cfg.model_output == "log_p_real" else real_vs_fake_log_odds
        fn = make(model, names.index("real"), names.index("fake"))
        return RewardFn(fn, f"model {reward_cfg.model_path} ({reward_cfg.model_output})", device=device, model=model)
    if kind == "classifier":
        model, _ = _load_frozen(reward_cfg, device)
        n = model.config["num_classes"]
        if reward_cfg.target_class >= n:
            raise RewardError(f"reward.target_class={reward_cfg.target_class} but the classifier has {n} classes")
        fn = classifier_log_prob(model, reward_cfg.target_class)
        return RewardFn(fn, f"classifier {reward_cfg.model_path}[{reward_cfg.target_class}]", device=device, model=model)
    raise RewardError(f"unknown reward.kind={kind!r}")
