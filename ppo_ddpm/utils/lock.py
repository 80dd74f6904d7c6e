"""One process per output_dir: an exclusive ``flock`` on ``{output_dir}/.lock``.

The lock file holds "pid host command" of its holder while it runs. The kernel drops a flock
when its process dies, so a lock left by a killed run is stale: the next run takes it over and
says whose it was. A second live process is refused with :class:`LockError` naming the holder.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = ".lock"


class LockError(RuntimeError):
    """Another live process holds the lock of the output_dir."""


class RunLock:
    """``with RunLock(output_dir):`` holds the folder's lock for the block (the folder is created)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def _holder(self) -> str:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return os.read(self.fd, 4096).decode("utf-8", "replace").strip()

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder() or "another process"
            os.close(self.fd)
            self.fd = None
            raise LockError(f"{self.path.parent} is in use by {holder}; wait for that run to end "
                            f"or choose another output_dir") from None
        stale = self._holder()
        if stale:
            print(f"[lock] took over the stale lock of {self.path.parent} (left by {stale}, no longer running)",
                  file=sys.stderr, flush=True)
        me = f"pid {os.getpid()} on {socket.gethostname()} ({' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])})"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me.encode(), 0)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # an empty lock file: nothing stale to report
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
