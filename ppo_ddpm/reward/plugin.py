"""Plug-in rewards: ``reward.function: "package.module:function"`` (attribute paths may be dotted).

The function is called as ``f(x0, class_labels)`` if it takes two positional arguments (or
``*args``), else ``f(x0)``; it must return one number per image ([B] tensor, array or list).
It gets a *copy* of x0 (and of the labels): editing it in place cannot touch the rollout cache.
A function that cannot take x0, or that raises, is a :class:`RewardError` naming ``reward.function``.
"""
from __future__ import annotations

import importlib
import inspect
import traceback
from typing import Callable, Optional

import torch

from .base import RewardError


def _takes_labels(fn: Callable, where: str) -> bool:
    """Whether ``fn`` is called with class_labels; RewardError when it cannot be called with x0."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: pass x0 only
        return False
    for args in ((0, 0), (0,)):
        try:
            sig.bind(*args)
            return len(args) == 2
        except TypeError:
            continue
    raise RewardError(f"{where}: cannot be called as f(x0) or f(x0, class_labels); its signature is {sig}")


class PluginReward:
    """``fn`` called on copies of its inputs; an exception inside it becomes a RewardError naming the plug-in."""

    def __init__(self, fn: Callable, spec: str, takes_labels: bool):
        self.fn, self.spec, self.takes_labels = fn, spec, takes_labels

    def __call__(self, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        x0 = x0.clone()
        labels = None if class_labels is None else class_labels.clone()
        try:
            return self.fn(x0, labels) if self.takes_labels else self.fn(x0)
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
    return PluginReward(obj, spec, _takes_labels(obj, where))
