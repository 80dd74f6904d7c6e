"""DDPM pretraining (Ho et al. 2020, Algorithm 1), for every ``model.prediction_type``, resumable.

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
    L = || target - f_theta(x_t, t[, y]) ||^2  (mean over pixels and batch), Adam,
    target = eps (epsilon), x_0 (sample) or sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v_prediction),
    EMA theta' <- d_k theta' + (1 - d_k) theta with d_k = min(ema_decay, (1 + k) / (10 + k)).

Data: the images of ``data.root/real`` (or ``data.root``); with ``data.root`` empty a procedural
dataset under ``{output_dir}/data``. Class-conditional models (``model.num_classes > 0``) read class c
from the sub-folder ``<folder>/<c>/``. Writes the EMA weights to ``{output_dir}/ddpm.pth`` (or
``.safetensors`` + ``.json``), the loss summary to ``{output_dir}/pretrain_metrics.json`` and the loss
curve to TensorBoard (``{output_dir}/tb``, tag ``pretrain/loss``).

Every ``pretrain.ckpt_every`` steps (and at the end) a checkpoint goes to
``{output_dir}/checkpoints/pretrain/last.pt`` (the one before as ``prev.pt``): model, EMA, Adam,
the RNG states and the losses so far. ``--resume`` continues from it, step for step as if never
stopped (``pretrain.steps`` may grow). Ctrl-C / SIGTERM finish the step, write a checkpoint and
exit 0. A NaN / inf loss or parameter stops the run (exit 2) without writing a checkpoint.

    python -m ppo_ddpm.pretrain --cfg configs/smoke.yaml --set pretrain.steps=200 [--resume | --overwrite]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import Config, add_config_args, config_from_args, config_to_dict, validate_config
from .data import DataError, load_images, resolve_data_root
from .ddpm.model import build_model, save_model
from .ddpm.schedules import NoiseSchedule
from .run_logger import tensorboard_writer
from .run_state import PRETRAIN_FORMAT, check_resumed_config, read_checkpoint, rng_state, save_last, set_rng_state
from .utils import resolve_device, set_seed
from .utils.checkpoint import atomic_write_text, refuse_overwrite
from .utils.cli import run_cli
from .utils.ema import ema_update_
from .utils.finite import DivergenceError, divergence
from .utils.lock import RunLock
from .utils.signals import GracefulStop, RunStopped

log = logging.getLogger(__name__)

# the config keys a pretraining checkpoint must agree on (RESUMABLE ones excepted)
CHECKPOINT_KEYS = ("seed", "model.", "schedule.", "data.", "pretrain.")


def model_path(cfg: Config) -> Path:
    return Path(cfg.output_dir) / f"ddpm.{cfg.pretrain.format}"


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "checkpoints" / "pretrain"


def load_training_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [N, 3, S, S] in [-1, 1] and class labels [N] (None when unconditional)."""
    root = resolve_data_root(cfg)
    folder = root / "real" if (root / "real").is_dir() else root
    if cfg.model.num_classes == 0:
        return load_images(folder, cfg.data.image_size), None
    class_dirs = [folder / str(c) for c in range(cfg.model.num_classes)]
    missing = [str(d) for d in class_dirs if not d.is_dir()]
    if missing:
        raise DataError(f"model.num_classes={cfg.model.num_classes}: class c is read from {folder}/<c>/; missing {missing}")
    parts = [load_images(d, cfg.data.image_size) for d in class_dirs]
    labels = torch.cat([torch.full((len(x),), c, dtype=torch.long) for c, x in enumerate(parts)])
    return torch.cat(parts), labels


def _check_finite(model: torch.nn.Module, losses: torch.Tensor, step: int, cfg: Config) -> None:
    """DivergenceError when the model or the losses of the steps since the last check are not finite."""
    window = losses[max(0, step - cfg.pretrain.log_every):step]
    bad = divergence(model, None if bool(window.isfinite().all()) else float("nan"))
    if bad:
        raise DivergenceError(
            f"pretraining diverged by step {step}: {bad}; nothing was saved for it (the last checkpoint in "
            f"{checkpoint_dir(cfg)}, if any, is intact). Lower pretrain.lr (now {cfg.pretrain.lr})")


def pretrain(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train the DDPM of ``cfg``; returns the path of the saved EMA model.

    ``resume``: continue from ``{output_dir}/checkpoints/pretrain/last.pt`` when it exists.
    Without ``resume`` or ``overwrite`` an existing model file or checkpoint is an error.
    """
    validate_config(cfg)
    pc = cfg.pretrain
    ckpt_dir, out_path = checkpoint_dir(cfg), model_path(cfg)
    state = None
    if resume and (ckpt_dir / "last.pt").is_file():
        state, path = read_checkpoint(ckpt_dir / "last.pt", PRETRAIN_FORMAT)
        check_resumed_config(path, state["config"], cfg, keys=CHECKPOINT_KEYS, name="pretrain")
    elif not (resume or overwrite):
        refuse_overwrite([out_path, ckpt_dir / "last.pt"])
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    images, labels = load_training_data(cfg)  # RGB: validate_config holds model.in_channels to 3
    model = build_model(cfg.model).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_config(cfg.schedule).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=pc.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = torch.zeros(pc.steps, device=device)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        set_rng_state(state["rng"])
        start = min(int(state["step"]), pc.steps)
        losses[:start] = state["losses"][:start].to(device)
        print(f"[pretrain] resumed from {path} at step {start}", file=sys.stderr, flush=True)
    log.info("pretraining on %d images %s: steps %d..%d, batches of %d, device %s", len(images), tuple(images.shape[1:]),
             start, pc.steps, pc.batch_size, device)

    def checkpoint(done: int) -> Path:
        _check_finite(model, losses, done, cfg)
        return save_last(ckpt_dir, {
            "format": PRETRAIN_FORMAT, "step": done, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "data_rng": gen.get_state(), "rng": rng_state(),
            "losses": losses[:done].cpu(), "config": config_to_dict(cfg)})

    writer = tensorboard_writer(cfg, purge_step=start if state is not None else None)
    t0 = time.perf_counter()
    try:
        with GracefulStop("pretrain", "step") as stop:
            bar = tqdm(range(start, pc.steps), initial=start, total=pc.steps, desc="pretrain", dynamic_ncols=True)
            for k in bar:
                idx = torch.randint(len(images), (pc.batch_size,), generator=gen)
                x0 = images[idx].to(device, non_blocking=True)
                y = labels[idx].to(device) if labels is not None else None
                t = torch.randint(schedule.num_train_timesteps, (pc.batch_size,), device=device)
                eps = torch.randn_like(x0)
                target = schedule.training_target(cfg.model.prediction_type, x0, t, eps)
                loss = F.mse_loss(model(schedule.q_sample(x0, t, eps), t, y), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema_update_(ema, model, min(pc.ema_decay, (1 + k) / (10 + k)))
                losses[k] = loss.detach()
                done = k + 1
                if done % pc.log_every == 0 or done == pc.steps:
                    _check_finite(model, losses, done, cfg)
                    window = losses[max(0, done - pc.log_every):done].mean().item()
                    bar.set_postfix(loss=f"{window:.4f}")
                    if writer is not None:
                        writer.add_scalar("pretrain/loss", window, done)  # mean over the last log_every steps
                if stop.requested:
                    bar.close()
                    raise RunStopped(f"stopped after step {done}/{pc.steps}; checkpoint {checkpoint(done)}")
                if done % pc.ckpt_every == 0 or done == pc.steps:
                    checkpoint(done)
            bar.close()
    finally:
        if writer is not None:
            writer.close()
    if state is not None and start == pc.steps:
        print(f"[pretrain] all {pc.steps} steps already done", file=sys.stderr, flush=True)
    n10 = max(1, pc.steps // 10)
    first, last = losses[:n10].mean().item(), losses[-n10:].mean().item()
    seconds = time.perf_counter() - t0
    path = save_model(ema, out_path, cfg.model)
    metrics = {"steps": pc.steps, "loss_first_10pct": first, "loss_last_10pct": last, "seconds": seconds,
               "model": path.name}
    atomic_write_text(json.dumps(metrics, indent=2), out_dir / "pretrain_metrics.json")
    log.info("pretrain loss: first 10%% of steps %.4f, last 10%% %.4f (%.1fs); EMA model saved to %s", first, last, seconds, path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.pretrain", description=__doc__.split("\n")[0]))
    parser.add_argument("--resume", action="store_true", help="continue from {output_dir}/checkpoints/pretrain/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over, replacing an existing model / checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        cfg = config_from_args(args)
        with RunLock(cfg.output_dir):
            print(f"[pretrain] EMA model -> {pretrain(cfg, resume=args.resume, overwrite=args.overwrite)}", flush=True)

    return run_cli("ppo_ddpm.pretrain", argv, body, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
