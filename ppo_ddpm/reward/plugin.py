"""Plug-in rewards: ``reward.function: "package.module:function"`` (attribute paths may be dotted).

The function is called as ``f(x0, class_labels)`` if it takes two positional arguments other
than ``step`` (or ``*args``), else ``f(x0)``; it must return one number per image ([B] tensor, array or list).
Opt-in metadata by keyword: a parameter named ``class_labels`` gets the labels [B] (or None), one
named ``step`` (or ``**kwargs``) the PPO iteration (``reward.context.current_step()``, None outside PPO).
It gets a *copy* of x0 (and of the labels): editing it in place cannot touch the rollout cache.
A function that cannot be called so, or that raises, is a :class:`RewardError` naming ``reward.function``.
"""
from __future__ import annotations

import importlib
import inspect
import traceback
from typing import Callable, Optional

import torch

from .base import RewardError
from .context import current_step


def _call_plan(fn: Callable, where: str) -> tuple[bool, bool, bool]:
    """(labels positional, labels by keyword, step by keyword) for calling ``fn``: class_labels go second
    when ``fn`` takes two positional arguments other than ``step`` (or ``*args``), else by keyword if it
    has a ``class_labels`` parameter; ``step`` by keyword if it has a ``step`` parameter or ``**kwargs``.
    RewardError when ``fn`` cannot be called so."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: pass x0 only
        return False, False, False
    params = sig.parameters.values()
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    wants_step = "step" in by_name or any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "step"]
    positional = any(p.kind is p.VAR_POSITIONAL for p in params) or len(named) >= 2
    keyword_labels = not positional and "class_labels" in by_name
    kw = dict.fromkeys(["step"] * wants_step + ["class_labels"] * keyword_labels, None)
    try:
        sig.bind(*((0, 0) if positional else (0,)), **kw)
    except TypeError:
        raise RewardError(f"{where}: cannot be called as f(x0) or f(x0, class_labels) (optional keywords: "
                          f"class_labels, step); its signature is {sig}") from None
    return positional, keyword_labels, wants_step


class PluginReward:
    """``fn`` called on copies of its inputs, with the metadata it asks for (module docstring); an
    exception inside it becomes a RewardError naming the plug-in."""

    def __init__(self, fn: Callable, spec: str):
        self.fn, self.spec = fn, spec
        self.labels_positional, self.labels_keyword, self.wants_step = _call_plan(fn, f"reward.function={spec!r}")

    def __call__(self, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        x0 = x0.clone()
        labels = None if class_labels is None else class_labels.clone()
        args = (x0, labels) if self.labels_positional else (x0,)
        kw = {"step": current_step()} if self.wants_step else {}
        if self.labels_keyword:
            kw["class_labels"] = labels
        try:
            return self.fn(*args, **kw)
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise RewardError(f"reward.function={self.spec!r} raised {type(e).__name__}: {e} "
                              f"(at {frame.filename}:{frame.lineno})") from e


def load_plugin(spec: str) -> PluginReward:
    """``"module:function"`` -> the callable wrapped as :class:`PluginReward`; errors name the value."""
    where = f"reward.function={spec!r}"
    module_name, sep, attr_path = (spec or "").partition(":")
    if not sep or not module_name or not attr_path:
        raise RewardError(f"{where}: expected 'module:function', e.g. 'my_rewards:brightness'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError or anything the module raises while importing
        raise RewardError(f"{where}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"{where}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{where}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return PluginReward(obj, spec)
