"""``python -m ppo_ddpm.finetune [--cfg FILE] [--set k=v ...] [--resume [PATH]]``: the PPO run.

1. With an empty ``model.pretrained`` (the embedded default) the pipeline stages run first
   (``ppo_ddpm.pipeline``: procedural data, DDPM pretraining, reward-model training).
2. PPO: ``cfg.ppo.iterations`` calls of ``PPOTrainer.step``; per iteration one JSON line in
   ``{output_dir}/metrics.jsonl`` and TensorBoard scalars under ``{output_dir}/tb``; sample grids
   every ``logging.sample_every``; atomic checkpoints every ``logging.ckpt_every`` and at the end
   in ``{output_dir}/checkpoints/`` (``last.pt``, the one before it as ``prev.pt``).
3. The fine-tuned policy (its EMA when ``ppo.ema_decay > 0``) is saved to ``{output_dir}/finetuned.pth`` and evaluated against the base
   model on the same noise (``ppo_ddpm.eval``).

A run checkpoint holds the trainer state (model, optimizer, EMA, group tracker), the RNG states
of python / numpy / torch CPU / every CUDA device of every rank, the number of completed
iterations and the config. ``--resume`` restores all of it and continues at the next iteration;
metrics.jsonl is cut back to the checkpoint. SIGINT / SIGTERM finish the current iteration,
write a checkpoint and exit 0 (a second signal abandons the iteration; the last checkpoint stays).

Under ``torchrun`` (WORLD_SIZE > 1) the process group uses nccl on CUDA and gloo on CPU, seeds are
offset by the rank, and only rank 0 runs the pipeline stages, logs, and writes files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import Config, ConfigError, add_config_args, config_from_args, config_from_dict, config_to_dict
from .pipeline import PipelineError, prepare, read_record
from .run_logger import RunLogger
from .utils import resolve_device, set_seed
from .utils.checkpoint import CheckpointError, atomic_save, atomic_write_text, safe_load

CKPT_FORMAT = "ppo_ddpm.run/1"
CKPT_KEYS = ("format", "iteration", "trainer", "rng", "config")
# config keys that may change between a checkpoint and its resumption
RESUMABLE = ("ppo.iterations", "device", "output_dir", "ppo.cuda_graphs", "ppo.use_kernels", "logging.", "eval.")
GRID_SAMPLES = 16


class Interrupted(BaseException):
    """A second SIGINT/SIGTERM: abandon the current iteration."""


# --------------------------------------------------------------------------- distributed


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initializes the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return 0, 1, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def _gather_rng(world: int) -> list:
    """Every rank's RNG state, indexed by rank."""
    state = rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------- checkpoints


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_run_checkpoint(ckpt_dir: Path, state: dict) -> Path:
    """Atomically write ``ckpt_dir/last.pt``; the previous last.pt becomes prev.pt (atomically too).

    last.pt exists at every instant once written: prev.pt is made from a hard link (or a copy)
    renamed into place, then the new state replaces last.pt.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, prev, tmp = ckpt_dir / "last.pt", ckpt_dir / "prev.pt", ckpt_dir / ".prev.pt.tmp"
    if last.is_file():
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copy2(last, tmp)
        os.replace(tmp, prev)
    return atomic_save(state, last)


def load_run_checkpoint(path: str | Path, cfg: Config, world: int = 1) -> dict:
    """Load a run checkpoint with ``safe_load`` and check it belongs to ``cfg`` and ``world`` processes.

    A missing key, another format, a config key that differs (other than those in RESUMABLE) or
    another number of processes (``ppo.batch_size`` is per rank: the global batch would change)
    raises :class:`CheckpointError` naming the file and the key.
    """
    path = Path(path)
    state = safe_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a ppo_ddpm run checkpoint (top level is a {type(state).__name__})")
    for key in CKPT_KEYS:
        if key not in state:
            raise CheckpointError(f"{path}: not a ppo_ddpm run checkpoint (missing key '{key}')")
    if state["format"] != CKPT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}, expected {CKPT_FORMAT!r}")
    saved_world = int(state.get("world_size", 1))
    if saved_world != world:
        raise CheckpointError(
            f"{path}: written by {saved_world} process(es) but this run has {world}; ppo.batch_size is per rank, "
            f"so the global batch would change: resume with torchrun --nproc_per_node={saved_world}"
        )
    try:
        saved = config_to_dict(config_from_dict(state["config"], source=f"{path} (config)"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    now = _flat(config_to_dict(cfg))
    for key, value in _flat(saved).items():
        if key.startswith(RESUMABLE) or key in RESUMABLE:
            continue
        if now.get(key) != value:
            raise CheckpointError(
                f"{path}: config key '{key}' is {value!r} in the checkpoint but {now.get(key)!r} in this run; "
                "resume with the config the checkpoint was written with"
            )
    return state


def _load_trainer_state(trainer, state: dict, path: Path) -> None:
    try:
        trainer.load_state_dict(state["trainer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: trainer state does not match this model/config: {' '.join(m.strip() for m in msg[:4])}") from None


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


# --------------------------------------------------------------------------- the run


def _resume_hint(argv: list[str], ckpt: Path) -> str:
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            if not a.startswith("-"):
                continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        args.append(a)
    return " ".join(["python -m ppo_ddpm.finetune", *args, "--resume", str(ckpt)])


def finetune(cfg: Config, resume: str | None = None, argv: list[str] | None = None) -> dict:
    """Run the pipeline stages, PPO and the evaluation; return {"stage_seconds", "eval", "stopped"}."""
    from .ddpm.model import build_model, save_model
    from .ppo import PPOTrainer
    from .reward import build_reward

    rank, world, device = init_distributed(cfg.device)
    main = rank == 0
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    if resume is None and (ckpt_dir / "last.pt").is_file():
        raise CheckpointError(f"{ckpt_dir / 'last.pt'} exists: pass --resume to continue that run, "
                              "or set another output_dir to start a new one")
    if main:
        cfg = prepare(cfg)
    _barrier()
    if not main:
        cfg = prepare(cfg, run=False)
    times = {k: v["seconds"] for k, v in read_record(out).items()}

    state, ckpt_path = None, None
    if resume is not None:
        ckpt_path = Path(resume) if resume else ckpt_dir / "last.pt"
        state = load_run_checkpoint(ckpt_path, cfg, world)

    set_seed(cfg.seed + rank)
    policy = build_model(cfg.model).to(device)
    reward_fn = build_reward(cfg.reward, device)
    trainer = PPOTrainer(cfg, policy, reward_fn, device)  # the KL reference is a frozen copy of the base

    start = 0
    if state is not None:
        _load_trainer_state(trainer, state, ckpt_path)
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start = int(state["iteration"])
    if main:
        truncate_metrics(out / "metrics.jsonl", start)  # a fresh run starts an empty file
        if state is not None:
            print(f"[finetune] resumed from {ckpt_path} at iteration {start}", flush=True)
    _barrier()

    def checkpoint(done: int) -> Path:
        rngs = _gather_rng(world)
        _barrier()
        if main:
            save_run_checkpoint(ckpt_dir, {"format": CKPT_FORMAT, "iteration": done, "trainer": trainer.state_dict(),
                                           "rng": rngs, "config": config_to_dict(cfg), "world_size": world})
        _barrier()
        return ckpt_dir / "last.pt"

    logger = RunLogger(cfg, start, main)
    grid_noise = torch.randn((GRID_SAMPLES, cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size),
                             generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    stop = {"signum": None}

    def on_signal(signum, frame):
        if stop["signum"] is not None:
            raise Interrupted(signum)
        stop["signum"] = signum
        if main:
            print(f"\n[finetune] {signal.Signals(signum).name}: finishing this iteration, then writing a checkpoint "
                  "(send it again to abandon the iteration)", file=sys.stderr, flush=True)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0, total = time.perf_counter(), cfg.ppo.iterations
    try:
        from tqdm import tqdm

        bar = tqdm(range(start, total), initial=start, total=total, desc="ppo", disable=not main, dynamic_ncols=True)
        for it in bar:
            stats = trainer.step(it)
            logger.log(it, stats)
            if not stats["skipped"]:
                logger.histograms(it, trainer.cache.rewards, trainer.cache.advantages)
            bar.set_postfix(reward=f"{stats.get('reward_mean', float('nan')):.4f}", kl=f"{stats.get('approx_kl', float('nan')):.2e}")
            if cfg.logging.sample_every > 0 and (it + 1) % cfg.logging.sample_every == 0:
                logger.grid(it, trainer.sample(grid_noise, cfg.seed))
            stopping = stop["signum"] is not None
            if world > 1:
                flag = torch.tensor([float(stopping)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if stopping or (it + 1) % max(1, cfg.logging.ckpt_every) == 0 or it + 1 == total:
                path = checkpoint(it + 1)
            if stopping:
                if main:
                    print(f"\n[finetune] stopped after iteration {it + 1}/{total}; checkpoint {path}\n"
                          f"[finetune] resume with: {_resume_hint(argv or [], path)}", file=sys.stderr, flush=True)
                return {"stage_seconds": times, "eval": None, "stopped": True}
        bar.close()
        if start >= total and main:
            print(f"[finetune] all {total} iterations already done", flush=True)
    except Interrupted:
        last = ckpt_dir / "last.pt"
        if main:
            done = safe_load(last)["iteration"] if last.is_file() else 0
            print(f"\n[finetune] iteration abandoned; the last checkpoint ({last}, {done} iterations) is intact\n"
                  f"[finetune] resume with: {_resume_hint(argv or [], last)}", file=sys.stderr, flush=True)
        return {"stage_seconds": times, "eval": None, "stopped": True}
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        logger.close()
    times["finetune"] = time.perf_counter() - t0

    result = {"stage_seconds": times, "eval": None, "stopped": False}
    if main:
        finetuned = out / "finetuned.pth"
        save_model(trainer.ema if trainer.ema is not None else policy, finetuned, cfg.model)
        from .eval import evaluate, format_summary

        t0 = time.perf_counter()
        result["eval"] = evaluate(cfg, cfg.model.pretrained, str(finetuned))
        times["eval"] = time.perf_counter() - t0
        print(format_summary(result["eval"]), flush=True)
        print("[finetune] stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    _barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ppo_ddpm.finetune", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue from a run checkpoint (no value: {output_dir}/checkpoints/last.pt)")
    args = parser.parse_args(argv)
    from .data import DataError
    from .reward import RewardError

    try:
        finetune(config_from_args(args), resume=args.resume, argv=argv)
    except (ConfigError, CheckpointError, PipelineError, DataError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
