"""The PPO iteration a reward is being computed for, visible to plug-ins that ask for it.

    with reward_step(iteration):      # PPOTrainer.step
        r = reward_fn(x0, labels)     # a plug-in f(x0, ..., step=None) receives step=iteration

Outside such a block ``current_step()`` is None (eval, reward-model checks).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

_STEP: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("ppo_ddpm_reward_step", default=None)


def current_step() -> Optional[int]:
    """The iteration set by the innermost :func:`reward_step`, or None."""
    return _STEP.get()


@contextlib.contextmanager
def reward_step(step: Optional[int]) -> Iterator[None]:
    """Make ``step`` the current iteration for the rewards computed inside the block."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)
