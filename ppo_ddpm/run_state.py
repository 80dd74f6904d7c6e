"""Resumable run checkpoints: the last/prev pair on disk, RNG capture, and the config check on resume.

A checkpoint folder holds ``last.pt`` and the one before it, ``prev.pt`` (a real copy). Each is a
dict of tensors / containers / primitives (``torch.load(weights_only=True)``-loadable) with at least

    format   "ppo_ddpm.run/1" (PPO, ``{output_dir}/checkpoints``) or "ppo_ddpm.pretrain/1"
             (DDPM pretraining, ``{output_dir}/checkpoints/pretrain``)
    config   the config dict the run was started with (before the pipeline filled in its paths)
    rng      RNG states (:func:`rng_state`; PPO: a list, one per rank)

PPO adds ``iteration``, ``trainer`` and ``world_size``; pretraining ``step``, ``model``, ``ema``,
``optimizer``, ``data_rng`` and ``losses``. A corrupt ``last.pt`` is replaced by ``prev.pt`` when
reading, with a message; a config that differs from the checkpoint's in a key outside
:data:`RESUMABLE` is refused.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .config import Config, ConfigError, config_from_dict, config_to_dict, flatten, key_matches
from .utils.checkpoint import (
    CheckpointError, atomic_copy, atomic_save, atomic_write_text, remove_stale_temp_files, safe_load, zip_intact,
)

RUN_FORMAT = "ppo_ddpm.run/1"
PRETRAIN_FORMAT = "ppo_ddpm.pretrain/1"
LAST, PREV = "last.pt", "prev.pt"
# config keys (a trailing "." is a prefix) that may change between a checkpoint and its resumption:
# how long, where and how fast the run goes, never what it computes (ppo.microbatch only splits the
# gradient accumulation)
RESUMABLE = ("ppo.iterations", "ppo.microbatch", "ppo.cuda_graphs", "ppo.use_kernels", "device", "output_dir",
             "logging.", "eval.", "pretrain.steps", "pretrain.log_every", "pretrain.ckpt_every", "pretrain.format")
# paths may differ (a moved run folder, another working directory); a difference is printed
PATH_KEYS = ("model.pretrained", "reward.model_path", "data.root")


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """RNG states of python, numpy, torch CPU and every CUDA device (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def gather_rng(world: int) -> list:
    """Every rank's :func:`rng_state`, indexed by rank (a collective when ``world > 1``)."""
    state = rng_state()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------- the last / prev pair


def save_last(ckpt_dir: str | Path, state: dict) -> Path:
    """Atomically write ``ckpt_dir/last.pt``; the previous last.pt becomes prev.pt first (an atomic copy),
    unless it is corrupt (then prev.pt, the checkpoint a resume fell back to, is kept).

    last.pt exists at every instant once written; a kill leaves the old pair or the new one.
    Temp files of an earlier killed write are removed first (the caller holds the run lock).
    """
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST
    for name in (LAST, PREV):
        remove_stale_temp_files(ckpt_dir, name)
    if last.is_file():
        if zip_intact(last):
            atomic_copy(last, ckpt_dir / PREV)
        else:
            print(f"[checkpoint] {last} is corrupt: replacing it, {ckpt_dir / PREV} stays", file=sys.stderr, flush=True)
    return atomic_save(state, last)


def read_checkpoint(path: str | Path, fmt: str) -> tuple[dict, Path]:
    """Load a checkpoint of format ``fmt`` -> (state, the path read).

    A ``last.pt`` that cannot be loaded is replaced by its sibling ``prev.pt`` (with a message on
    stderr); when that fails too, or for any other file, :class:`CheckpointError` names the file(s).
    """
    path = Path(path)
    try:
        return _read(path, fmt), path
    except CheckpointError as e:
        prev = path.with_name(PREV)
        if path.name != LAST or not path.is_file() or not prev.is_file():
            raise
        print(f"[checkpoint] {path} cannot be loaded ({e}); falling back to {prev}, the checkpoint before it",
              file=sys.stderr, flush=True)
        try:
            return _read(prev, fmt), prev
        except CheckpointError as e2:
            raise CheckpointError(f"{e}\nand the fallback {prev} fails too: {e2}") from None


def _read(path: Path, fmt: str) -> dict:
    state = safe_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a ppo_ddpm checkpoint (top level is a {type(state).__name__})")
    for key in ("format", "config", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}: not a ppo_ddpm checkpoint (missing key '{key}')")
    if state["format"] != fmt:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}, expected {fmt!r}")
    return state


# --------------------------------------------------------------------------- config on resume


def check_resumed_config(path: Path, saved: dict, cfg: Config, keys: Iterable[str] = ("",), name: str = "resume") -> None:
    """Refuse (CheckpointError naming ``path`` and the key) a ``cfg`` whose keys under the prefixes
    ``keys`` differ from the checkpoint's config ``saved``, outside RESUMABLE; print differing paths."""
    try:
        saved = flatten(config_to_dict(config_from_dict(saved, source=f"{path} (config)")))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    now = flatten(config_to_dict(cfg))
    keys = tuple(keys)
    for key, value in saved.items():
        if not any(key.startswith(k) for k in keys) or key_matches(key, RESUMABLE) or now.get(key) == value:
            continue
        if key in PATH_KEYS:
            print(f"[{name}] {key} is {now.get(key)!r} now, {value!r} in {path}; using {now.get(key)!r}",
                  file=sys.stderr, flush=True)
            continue
        raise CheckpointError(
            f"{path}: config key '{key}' is {value!r} in the checkpoint but {now.get(key)!r} in this run; "
            "resume with the config the checkpoint was written with"
        )


def load_run_checkpoint(path: str | Path, cfg: Config, world: int = 1) -> tuple[dict, Path]:
    """Read a PPO run checkpoint (falling back from a corrupt last.pt to prev.pt) and check it belongs to
    ``cfg`` and ``world`` processes -> (state, path read).

    A missing key, another format, a config key that differs (other than RESUMABLE / PATH_KEYS) or
    another number of processes (``ppo.batch_size`` is per rank: the global batch would change)
    raises :class:`CheckpointError` naming the file and the key.
    """
    state, path = read_checkpoint(path, RUN_FORMAT)
    for key in ("iteration", "trainer"):
        if key not in state:
            raise CheckpointError(f"{path}: not a ppo_ddpm run checkpoint (missing key '{key}')")
    saved_world = int(state.get("world_size", 1))
    if saved_world != world:
        raise CheckpointError(
            f"{path}: written by {saved_world} process(es) but this run has {world}; ppo.batch_size is per rank, "
            f"so the global batch would change: resume with torchrun --nproc_per_node={saved_world}"
        )
    check_resumed_config(path, state["config"], cfg, name="finetune")
    return state, path


def truncate_metrics(path: Path, iterations: int) -> None:
    """Keep the lines of metrics.jsonl with iteration < ``iterations`` (drops a torn last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("iteration", iterations) >= iterations:
            break
        kept.append(line)
    atomic_write_text("".join(f"{line}\n" for line in kept), path)
