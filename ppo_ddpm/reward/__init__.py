"""Frozen rewards of x_0: built-in (JPEG, classifier, real-vs-fake CNN) or plug-in.

    reward_fn = build_reward(cfg.reward, device)
    r = reward_fn(x0, class_labels)              # [B] float32 on x0's device, no grad
    r, finite = check_reward(r, B, reward_fn.name)  # trainer: skip the batch if not finite.all()

``cfg.reward.kind``:

- ``model``: the RewardCNN at ``model_path`` (trained by ``python -m ppo_ddpm.train_reward_model``):
  log-odds of "real", logit_real - logit_fake, or log p(real) (``model_output``);
- ``classifier``: log p(target_class | x0) of the RewardCNN at ``model_path``, trained on the class
  folders ``data.root/<class>/`` (``target_class < 0``: the class label of each sample);
- ``jpeg_compressibility`` / ``jpeg_incompressibility``: -/+ JPEG (q95) size in kB (DDPO);
- ``random``: N(0, 1) seeded by the image's bytes, the random-reward control;
- ``plugin``: ``function = "module:function"`` (may receive ``class_labels`` and ``step`` by keyword);
- ``terms: [{kind, weight, ...}]``: the weighted sum of several of the above (``terms.py``).
"""
from __future__ import annotations

import dataclasses

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
from .context import current_step, reward_step
from .plugin import load_plugin
from .terms import WeightedSum, term_means, term_names, trained_model_kind

__all__ = [
    "CLASS_NAMES", "RewardCNN", "RewardError", "RewardFn", "build_reward", "check_reward",
    "classifier_log_prob", "freeze", "jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb",
    "load_plugin", "load_reward_model", "random_reward", "real_vs_fake_log_odds", "real_vs_fake_log_p_real", "save_reward_model",
    "WeightedSum", "current_step", "reward_step", "term_means", "term_names", "trained_model_kind",
]


def _load_frozen(reward_cfg, device: torch.device) -> tuple[RewardCNN, dict]:
    if not reward_cfg.model_path:
        raise RewardError(
            f"reward.kind={reward_cfg.kind!r} needs reward.model_path (a reward CNN written by "
            "`python -m ppo_ddpm.train_reward_model`), but it is empty"
        )
    model, meta = load_reward_model(reward_cfg.model_path, device)
    return freeze(model), meta


def _build_one(reward_cfg, device: torch.device) -> RewardFn:
    """One reward from the keys kind, model_path, target_class, function (a RewardConfig or RewardTermConfig)."""
    kind = reward_cfg.kind
    if kind == "jpeg_compressibility":
        return RewardFn(jpeg_compressibility, kind)
    if kind == "jpeg_incompressibility":
        return RewardFn(jpeg_incompressibility, kind)
    if kind == "random":
        return RewardFn(random_reward, kind)
    if kind == "plugin":
        return RewardFn(load_plugin(reward_cfg.function), f"plugin {reward_cfg.function}")
    if kind == "model":
        model, meta = _load_frozen(reward_cfg, device)
        names = meta["class_names"]
        if "real" not in names or "fake" not in names:
            raise RewardError(f"reward model {reward_cfg.model_path} has classes {names}, expected 'real' and 'fake'")
        make = real_vs_fake_log_p_real if reward_cfg.model_output == "log_p_real" else real_vs_fake_log_odds
        fn = make(model, names.index("real"), names.index("fake"))
        return RewardFn(fn, f"model {reward_cfg.model_path} ({reward_cfg.model_output})", device=device, model=model)
    if kind == "classifier":
        model, meta = _load_frozen(reward_cfg, device)
        n, target = model.config["num_classes"], reward_cfg.target_class
        if target >= n:
            raise RewardError(f"reward.target_class={target} but the classifier has {n} classes")
        fn = classifier_log_prob(model, target)
        label = f"={meta['class_names'][target]!r}" if 0 <= target < len(meta["class_names"]) else " (each sample's label)"
        return RewardFn(fn, f"classifier {reward_cfg.model_path}[{target}{label}]", device=device, model=model)
    raise RewardError(f"unknown reward.kind={kind!r}")


def build_reward(reward_cfg, device: str | torch.device = "cpu") -> RewardFn | WeightedSum:
    """``cfg.reward`` -> a frozen :class:`RewardFn`, or a :class:`WeightedSum` of ``reward.terms``
    (a term with an empty model_path uses ``reward.model_path``); models are loaded onto ``device``."""
    device = torch.device(device)
    if not reward_cfg.terms:
        return _build_one(reward_cfg, device)
    terms = []
    for i, (name, term) in enumerate(zip(term_names(reward_cfg), reward_cfg.terms)):
        term = dataclasses.replace(term, model_path=term.model_path or reward_cfg.model_path)
        try:
            terms.append((name, term.weight, _build_one(term, device)))
        except RewardError as e:
            raise RewardError(f"reward.terms[{i}] ({name}): {e}") from None
    return WeightedSum(terms)
