"""Stopping a long loop cleanly on SIGINT (Ctrl-C) / SIGTERM.

    with GracefulStop("pretrain", "step") as stop:
        for k in ...:
            ...one step...
            if stop.requested:
                save a checkpoint; raise RunStopped(f"stopped after step {k + 1}; checkpoint {path}")

The first signal only sets ``stop.requested`` (the step in flight finishes); a second raises
:class:`Interrupted` at once, abandoning the step (the last checkpoint stays). CLIs turn a
:class:`RunStopped` into a message with the resume command and exit code 0.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional


class Interrupted(BaseException):
    """A second SIGINT/SIGTERM: abandon the current step."""


class RunStopped(Exception):
    """A run stopped on request after writing a checkpoint (its message names it); it can be resumed."""


class GracefulStop:
    """Installs SIGINT / SIGTERM handlers for a ``with`` block (main thread only; elsewhere a no-op)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, name: str, unit: str = "step", announce: bool = True):
        self.name, self.unit, self.announce = name, unit, announce
        self.signum: Optional[int] = None
        self._saved: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        if self.announce:
            print(f"\n[{self.name}] {signal.Signals(signum).name}: finishing this {self.unit}, then writing a checkpoint "
                  f"(send it again to abandon the {self.unit})", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved = {}
