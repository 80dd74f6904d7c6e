"""``python -m ppo_ddpm.finetune [--cfg FILE] [--set k=v ...] [--resume [PATH] | --overwrite]``: the PPO run.

1. With an empty ``model.pretrained`` (the embedded default) the pipeline stages run first
   (``ppo_ddpm.pipeline``: procedural data, DDPM pretraining, reward-model training).
2. PPO: ``cfg.ppo.iterations`` calls of ``PPOTrainer.step``; per iteration one JSON line in
   ``{output_dir}/metrics.jsonl`` and TensorBoard scalars under ``{output_dir}/tb``; sample grids
   every ``logging.sample_every``; atomic checkpoints every ``logging.ckpt_every`` and at the end
   in ``{output_dir}/checkpoints/`` (``last.pt``, the one before it as ``prev.pt``; ``run_state``).
3. The fine-tuned policy (its EMA when ``ppo.ema_decay > 0``) is saved to ``{output_dir}/finetuned.pth``
   and evaluated against the base model on the same noise (``ppo_ddpm.eval``).

Before any stage: the config is validated, the output_dir locked (one process per folder), and
either ``--resume`` finds its checkpoint (readable, same config: ``run_state``; a corrupt last.pt
falls back to prev.pt) or, for a fresh run, nothing of an earlier run is in the way (else
``--overwrite``). ``--resume`` without a PPO checkpoint continues an interrupted pipeline stage.
``--resume`` restores the trainer, the RNG states of every rank and the iteration count, and cuts
metrics.jsonl back to the checkpoint. SIGINT / SIGTERM finish the current iteration (or
pretraining step), write a checkpoint and exit 0 (a second signal abandons it; the last checkpoint
stays). NaN / inf parameters or loss stop the run with exit 2 before a checkpoint is written.

Under ``torchrun`` (WORLD_SIZE > 1) the process group uses nccl on CUDA and gloo on CPU, seeds are
offset by the rank, and only rank 0 runs the pipeline stages, logs, and writes files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import Config, add_config_args, config_from_args, config_to_dict, validate_config
from .pipeline import STATE_FILE, prepare, read_record
from .ppo import distributed as dist_utils
from .pretrain import checkpoint_dir as pretrain_checkpoint_dir
from .run_logger import RunLogger
from .run_state import RUN_FORMAT, gather_rng, load_run_checkpoint, save_last, set_rng_state, truncate_metrics
from .utils import set_seed
from .utils.checkpoint import CheckpointError, refuse_overwrite, safe_load
from .utils.cli import run_cli
from .utils.finite import DivergenceError, divergence
from .utils.lock import RunLock
from .utils.signals import GracefulStop, Interrupted, RunStopped

GRID_SAMPLES = 16


# --------------------------------------------------------------------------- the run


def _resume_state(resume: str, cfg: Config, world: int) -> tuple[dict | None, Path | None]:
    """The checkpoint ``--resume`` points at, read and checked -> (state, path); (None, None) when
    ``--resume`` has no path, there is no PPO checkpoint yet, but a pipeline stage was interrupted."""
    out = Path(cfg.output_dir)
    path = Path(resume) if resume else out / "checkpoints" / "last.pt"
    if not resume and not path.is_file():
        if (out / STATE_FILE).is_file() or (pretrain_checkpoint_dir(cfg) / "last.pt").is_file():
            print(f"[finetune] no PPO checkpoint in {path.parent} yet: continuing the pipeline stages", flush=True)
            return None, None
        raise CheckpointError(f"nothing to resume in {out}: {path} does not exist (start without --resume)")
    return load_run_checkpoint(path, cfg, world)


def _earlier_run(cfg: Config) -> list[Path]:
    """Files of an earlier PPO run in output_dir that a fresh run would overwrite (the pipeline checks its own)."""
    out = Path(cfg.output_dir)
    return [out / "checkpoints" / "last.pt", out / "metrics.jsonl", out / "finetuned.pth"]


def _load_trainer_state(trainer, state: dict, path: Path) -> None:
    try:
        trainer.load_state_dict(state["trainer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: trainer state does not match this model/config: {' '.join(m.strip() for m in msg[:4])}") from None


def finetune(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    """Run the pipeline stages, PPO and the evaluation; return {"stage_seconds", "eval"}.

    ``resume``: None (a fresh run), "" (``{output_dir}/checkpoints/last.pt``) or a checkpoint path.
    Raises RunStopped after a signal (a checkpoint was written) and DivergenceError on NaN / inf.
    """
    from .ddpm.model import build_model, save_model
    from .ppo import PPOTrainer
    from .reward import build_reward

    validate_config(cfg)
    rank, world, device = dist_utils.init_distributed(cfg.device)
    main = rank == 0
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    state, ckpt_path = None, None
    if resume is not None:  # every check of the checkpoint comes before any stage runs
        state, ckpt_path = _resume_state(resume, cfg, world)
    elif not overwrite:
        refuse_overwrite(_earlier_run(cfg))
    run_cfg = prepare(cfg, resume=resume is not None, overwrite=overwrite) if main else None
    dist_utils.barrier()
    if not main:
        run_cfg = prepare(cfg, run=False)
    times = {k: v["seconds"] for k, v in read_record(out).items()}

    set_seed(cfg.seed + rank)
    policy = build_model(run_cfg.model).to(device)
    reward_fn = build_reward(run_cfg.reward, device)
    trainer = PPOTrainer(run_cfg, policy, reward_fn, device)  # the KL reference is a frozen copy of the base

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
    dist_utils.barrier()

    def checkpoint(done: int) -> Path:
        rngs = gather_rng(world)
        dist_utils.barrier()
        if main:  # the config as given: the pipeline's paths are found again through pipeline.json
            save_last(ckpt_dir, {"format": RUN_FORMAT, "iteration": done, "trainer": trainer.state_dict(),
                                 "rng": rngs, "config": config_to_dict(cfg), "world_size": world})
        dist_utils.barrier()
        return ckpt_dir / "last.pt"

    def kept() -> str:
        def done(f: Path) -> str:
            try:
                return f"{safe_load(f)['iteration']} iterations"
            except (CheckpointError, KeyError, TypeError):
                return "unreadable"

        files = [ckpt_dir / name for name in ("last.pt", "prev.pt") if (ckpt_dir / name).is_file()]
        return ", ".join(f"{f} ({done(f)})" for f in files) or "none yet"

    logger = RunLogger(run_cfg, start, main)
    grid_noise = torch.randn((GRID_SAMPLES, cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size),
                             generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    t0, total = time.perf_counter(), cfg.ppo.iterations
    try:
        with GracefulStop("finetune", "iteration", announce=main) as stop:
            from tqdm import tqdm

            bar = tqdm(range(start, total), initial=start, total=total, desc="ppo", disable=not main, dynamic_ncols=True)
            for it in bar:
                stats = trainer.step(it)
                bad = divergence(trainer.policy, stats.get("loss"), stats.get("nonfinite_samples", 0))
                if dist_utils.any_rank(bad is not None, device):
                    raise DivergenceError(
                        f"iteration {it}: the policy diverged ({bad or 'on another rank'}); no checkpoint was written "
                        f"for it. Checkpoints kept: {kept()}. Lower ppo.lr (now {cfg.ppo.lr}) or ppo.grad_clip "
                        f"(now {cfg.ppo.grad_clip}) and resume from one of them")
                logger.log(it, stats)
                if not stats["skipped"]:
                    logger.histograms(it, trainer.cache.rewards, trainer.cache.advantages)
                bar.set_postfix(reward=f"{stats.get('reward_mean', float('nan')):.4f}", kl=f"{stats.get('approx_kl', float('nan')):.2e}")
                if cfg.logging.sample_every > 0 and (it + 1) % cfg.logging.sample_every == 0:
                    logger.grid(it, trainer.sample(grid_noise, cfg.seed))
                stopping = dist_utils.any_rank(stop.requested, device)
                if stopping or (it + 1) % cfg.logging.ckpt_every == 0 or it + 1 == total:
                    path = checkpoint(it + 1)
                if stopping:
                    raise RunStopped(f"stopped after iteration {it + 1}/{total}; checkpoint {path}")
            bar.close()
    except Interrupted:
        raise RunStopped(f"iteration abandoned; the checkpoints are intact: {kept()}") from None
    finally:
        logger.close()
    if start >= total and main:
        print(f"[finetune] all {total} iterations already done", flush=True)
    times["finetune"] = time.perf_counter() - t0

    result = {"stage_seconds": times, "eval": None}
    if main:
        finetuned = out / "finetuned.pth"
        save_model(trainer.ema if trainer.ema is not None else policy, finetuned, cfg.model)
        from .eval import evaluate, format_summary

        t0 = time.perf_counter()
        result["eval"] = evaluate(run_cfg, run_cfg.model.pretrained, str(finetuned))
        times["eval"] = time.perf_counter() - t0
        print(format_summary(result["eval"]), flush=True)
        print("[finetune] stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    dist_utils.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ppo_ddpm.finetune", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue from a run checkpoint (no value: {output_dir}/checkpoints/last.pt, "
                             "or the interrupted pipeline stage)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds an earlier run (its files are replaced)")
    args = parser.parse_args(argv)
    if args.resume is not None and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")

    def body() -> None:
        cfg = config_from_args(args)
        with RunLock(cfg.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
            finetune(cfg, resume=args.resume, overwrite=args.overwrite)

    try:
        return run_cli("ppo_ddpm.finetune", argv, body, resumable=True)
    finally:
        dist_utils.destroy()


if __name__ == "__main__":
    sys.exit(main())
