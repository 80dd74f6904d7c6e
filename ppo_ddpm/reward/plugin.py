"""Plug-in rewards: ``reward.function: "package.module:function"`` (attribute paths may be dotted).

The function is called as ``f(x0, class_labels)`` if it takes two positional arguments (or
``*args``), else ``f(x0)``; it must return one number per image ([B] tensor, array or list).
Opt-in metadata by keyword: a parameter named ``class_labels`` gets the labels [B] (or None), one
named ``step`` (or ``**kwargs``) the PPO iteration (``reward.context.current_step()``, None outside PPO).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from .base import RewardError
from .context import current_step


def _takes_labels(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: pass x0 only
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "step"]
    return len(positional) >= 2


def _with_metadata(fn: Callable) -> tuple[Callable, bool]:
    """(callable, takes_labels) passing ``class_labels`` / ``step`` by keyword where ``fn`` asks for them."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn, False
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    wants_step = "step" in by_name or any(p.kind is p.VAR_KEYWORD for p in params)
    positional = _takes_labels(fn)
    keyword_labels = not positional and "class_labels" in by_name
    if not (wants_step or keyword_labels):
        return fn, positional

    def call(x0, class_labels=None):
        kw = {"step": current_step()} if wants_step else {}
        if keyword_labels:
            kw["class_labels"] = class_labels
        return fn(x0, class_labels, **kw) if positional else fn(x0, **kw)

    return call, positional or keyword_labels


def load_plugin(spec: str) -> tuple[Callable, bool]:
    """``"module:function"`` -> (callable, whether it takes class_labels); errors name the value."""
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
    return _with_metadata(obj)
