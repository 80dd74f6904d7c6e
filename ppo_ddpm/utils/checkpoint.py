"""Crash-safe checkpoint files that only ever load weights.

Writes go to a temp file ``.{name}.{random}.tmp`` in the target's directory (created with mode
0o666 minus the umask, as ``open`` would), are flushed and fsynced, then ``os.replace``d over the
target, so a reader sees the old file or the new one, never half of one. A full disk raises
:class:`DiskFullError` and leaves the old file in place; temp files of a killed writer are removed
by :func:`remove_stale_temp_files`.
Reads use ``torch.load(weights_only=True)`` or safetensors: tensors, dicts, lists, tuples and
primitives only, never arbitrary pickled objects.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import secrets
import shutil
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

_ALLOWED_LEAVES = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or holds something other than weights."""


def _check_weights_only(obj: Any, where: str = "obj") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, _ALLOWED_LEAVES):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, dicts, lists, tuples and primitives")


class DiskFullError(CheckpointError):
    """No space left on the device while writing a file; the previous version of the file is intact."""


def _temp_file(path: Path) -> tuple[int, Path]:
    """(fd, path) of a new temp file next to ``path``; mode 0o666 & ~umask (mkstemp would force 0o600)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``; fsync it and rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(path)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise
    return path


def _raise_if_disk_full(e: BaseException, path: Path) -> None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"no space left on the device writing {path} ({e.strerror}); nothing was replaced: the previous "
            f"{path.name}, if any, is intact. Free some space and run again (with --resume to continue a run)"
        ) from None


def remove_stale_temp_files(folder: str | Path, name: str) -> list[Path]:
    """Delete the ``.{name}.*.tmp`` files an interrupted :func:`_atomic_write` left in ``folder``
    (call it only while holding the folder's run lock: then no other writer is active)."""
    stale = sorted(Path(folder).glob(f".{name}.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
        print(f"[checkpoint] removed {p}, a partial file left by an interrupted write", file=sys.stderr, flush=True)
    return stale


def refuse_overwrite(paths, flags: str = "--resume to continue, or --overwrite to start over") -> None:
    """CheckpointError naming every path of ``paths`` that exists (a run must not silently overwrite them)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        raise CheckpointError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: pass {flags}, "
                              "or choose another output_dir")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; ``obj`` must be loadable with weights_only=True.

    The object is serialized in memory first, so a failed write is a plain OSError (torch.save into a
    file turns it into an opaque RuntimeError).
    """
    _check_weights_only(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _atomic_write(Path(path), lambda f: f.write(buf.getbuffer()))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (a real copy: never a hard link to ``src``)."""
    with open(src, "rb") as s:
        return _atomic_write(Path(dst), lambda f: shutil.copyfileobj(s, f, 1 << 20))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file (UTF-8) atomically."""
    data = text.encode("utf-8")
    return _atomic_write(Path(path), lambda f: f.write(data))


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any refusal or corruption raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(only weights are loaded: torch.load(weights_only=True) accepts tensors, dicts, lists and "
            "primitives; the file is corrupt, truncated, or holds other objects)"
        ) from None


def zip_intact(path: str | Path) -> bool:
    """Whether ``path`` is a complete ``torch.save`` zip archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (tensors made contiguous and moved to CPU)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(flat, metadata=metadata)
    return _atomic_write(Path(path), lambda f: f.write(data))


def load_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file -> (tensors, metadata); corruption raises :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot load safetensors file {path}: {e}") from None
    return tensors, metadata


def read_json(path: str | Path) -> dict:
    """Load a JSON object from ``path``; a missing or malformed file raises :class:`CheckpointError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
