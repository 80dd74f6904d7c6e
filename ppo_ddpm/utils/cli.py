"""What the CLIs share: exit codes, error messages, the resume command.

    sys.exit(run_cli("ppo_ddpm.pretrain", argv, body, resumable=True))

- a clear error (bad config, checkpoint, data, reward, pipeline, divergence, lock, full disk):
  ``error: <message>`` on stderr, exit 2;
- a run stopped on request (:class:`~ppo_ddpm.utils.signals.RunStopped`, after a checkpoint) or
  abandoned by a second signal: what was kept and the resume command, exit 0;
- Ctrl-C anywhere else: one line saying so, exit 130 (every file is written atomically, so none is
  half-written), no traceback.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable

from .signals import Interrupted, RunStopped

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


def clear_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (no traceback)."""
    from ..config import ConfigError
    from ..data import DataError
    from ..pipeline import PipelineError
    from ..reward import RewardError
    from .checkpoint import CheckpointError
    from .finite import DivergenceError
    from .lock import LockError

    return ConfigError, CheckpointError, PipelineError, DataError, RewardError, DivergenceError, LockError


def resume_command(prog: str, argv: list[str]) -> str:
    """``python -m prog`` with ``argv`` minus any ``--resume [PATH]`` / ``--overwrite``, plus ``--resume``."""
    args, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if not (a.startswith("--resume=") or a == "--overwrite"):
            args.append(a)
        i += 1
    return " ".join(["python -m", prog, *args, "--resume"])


def run_cli(prog: str, argv: list[str], body: Callable[[], None], resumable: bool = False,
            errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``body()`` and map its outcome to an exit code and a message (see the module docstring);
    ``errors``: further exception types of this CLI that are clear errors (exit 2)."""
    name = prog.rsplit(".", 1)[-1]
    hint = f"\n[{name}] resume with: {resume_command(prog, argv)}" if resumable else ""
    try:
        body()
    except RunStopped as e:
        print(f"\n[{name}] {e}{hint}", file=sys.stderr, flush=True)
    except Interrupted:
        print(f"\n[{name}] abandoned on a second signal; the last checkpoint is intact{hint}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"\n[{name}] interrupted (Ctrl-C) before it finished; files are written atomically, so none is "
              f"half-written{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (*clear_errors(), *errors) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device ({e.filename or e.strerror}); free some space and run again"
              f"{' with --resume' if resumable else ''}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    return EXIT_OK
