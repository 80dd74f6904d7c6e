"""Plug-in rewards: ``reward.function: "package.module:function"`` (attribute paths may be dotted).

The function is called as ``f(x0, class_labels)`` if it takes two positional arguments (or
``*args``), else ``f(x0)``; it must return one number per image ([B] tensor, array or list).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from .base import RewardError


def _takes_labels(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: pass x0 only
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


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
    return obj, _takes_labels(obj)
