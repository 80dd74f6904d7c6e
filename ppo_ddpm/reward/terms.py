"""A weighted sum of rewards, each term kept for logging (``reward.terms``).

    r(x0) = sum_k w_k r_k(x0, class_labels)          r_k: a built-in or plug-in reward, [B] float32

After every call ``last_terms`` holds the unweighted r_k [B] of that batch by term name;
:func:`term_means` turns them into the trainer's per-iteration stats ``reward_term/<name>``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import RewardError, RewardFn


class WeightedSum:
    """``r = sum_k w_k r_k(x0, class_labels)`` over ``terms`` = [(name, weight, RewardFn)] (names unique)."""

    def __init__(self, terms: list[tuple[str, float, RewardFn]]):
        if not terms:
            raise RewardError("reward.terms is empty")
        names = [n for n, _, _ in terms]
        if len(set(names)) != len(names):
            raise RewardError(f"reward.terms: term names must be unique, got {names}; give each a 'name'")
        self.terms = terms
        self.name = " + ".join(f"{w:g} {n}" for n, w, _ in terms)
        self.last_terms: dict[str, torch.Tensor] = {}

    def __call__(self, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        values = {name: fn(x0, class_labels) for name, _, fn in self.terms}
        self.last_terms = values
        return sum(w * values[name] for name, w, _ in self.terms)

    def __repr__(self) -> str:
        return f"WeightedSum({self.name})"


def term_means(reward_fn, gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
    """{"reward_term/<name>": mean of r_k over the (gathered, global) batch} of the last call of a
    :class:`WeightedSum`; {} for any other reward."""
    terms = getattr(reward_fn, "last_terms", None) or {}
    return {f"reward_term/{name}": gather(r.float()).mean().item() for name, r in terms.items()}


def term_names(reward_cfg) -> list[str]:
    """The log name of each of ``reward_cfg.terms``: its ``name``, else its kind (#i from the second of a kind)."""
    names, seen = [], {}
    for term in reward_cfg.terms:
        if term.name:
            names.append(term.name)
            continue
        seen[term.kind] = seen.get(term.kind, 0) + 1
        names.append(term.kind if seen[term.kind] == 1 else f"{term.kind}#{seen[term.kind]}")
    return names


def trained_model_kind(reward_cfg) -> Optional[str]:
    """``"model"`` or ``"classifier"`` when the reward needs ``reward.model_path`` and it is empty (the
    pipeline then trains it: real-vs-fake CNN or class-folder classifier), else None."""
    if reward_cfg.model_path:
        return None
    if not reward_cfg.terms:
        return reward_cfg.kind if reward_cfg.kind in ("model", "classifier") else None
    kinds = {t.kind for t in reward_cfg.terms if t.kind in ("model", "classifier") and not t.model_path}
    if len(kinds) > 1:
        raise RewardError("reward.terms: a 'model' and a 'classifier' term both use reward.model_path; "
                          "give one of them its own model_path")
    return kinds.pop() if kinds else None
