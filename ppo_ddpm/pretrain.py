"""DDPM pretraining (Ho et al. 2020, Algorithm 1), for every ``model.prediction_type``.

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
    L = || target - f_theta(x_t, t[, y]) ||^2  (mean over pixels and batch), Adam,
    target = eps (epsilon), x_0 (sample) or sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v_prediction),
    EMA theta' <- d_k theta' + (1 - d_k) theta with d_k = min(ema_decay, (1 + k) / (10 + k)).

Data: the images of ``data.root/real`` (or ``data.root``); with ``data.root`` empty a procedural
dataset under ``{output_dir}/data``. Class-conditional models (``model.num_classes > 0``) read class c
from the sub-folder ``<folder>/<c>/``. Writes the EMA weights to ``{output_dir}/ddpm.pth`` (or
``.safetensors`` + ``.json``), the loss summary to ``{output_dir}/pretrain_metrics.json`` and the loss
curve to TensorBoard (``{output_dir}/tb``, tag ``pretrain/loss``).

    python -m ppo_ddpm.pretrain --cfg configs/smoke.yaml --set pretrain.steps=200
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

from .config import Config, ConfigError, add_config_args, config_from_args
from .data import DataError, load_images, make_procedural_dataset
from .ddpm.model import build_model, save_model
from .ddpm.schedules import NoiseSchedule
from .run_logger import tensorboard_writer
from .utils import resolve_device, set_seed
from .utils.checkpoint import CheckpointError, atomic_write_text

log = logging.getLogger(__name__)


def load_training_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [N, 3, S, S] in [-1, 1] and class labels [N] (None when unconditional)."""
    root = Path(cfg.data.root) if cfg.data.root else make_procedural_dataset(
        Path(cfg.output_dir) / "data", cfg.data.procedural_count, cfg.data.image_size, cfg.seed
    )
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


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta' <- decay theta' + (1 - decay) theta, for every parameter and floating buffer."""
    ema_p, p = list(ema.parameters()), [q.detach() for q in model.parameters()]
    torch._foreach_lerp_(ema_p, p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def pretrain(cfg: Config) -> Path:
    """Train the DDPM of ``cfg``; returns the path of the saved EMA model."""
    pc = cfg.pretrain
    if pc.steps < 1 or pc.batch_size < 1:
        raise ConfigError(f"pretrain.steps and pretrain.batch_size must be >= 1, got {pc.steps}, {pc.batch_size}")
    if cfg.data.image_size != cfg.model.sample_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} differs from model.sample_size={cfg.model.sample_size}")
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    images, labels = load_training_data(cfg)
    if images.shape[1] != cfg.model.in_channels:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels} but the images have {images.shape[1]} channels")
    model = build_model(cfg.model).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_config(cfg.schedule).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=pc.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info("pretraining on %d images %s, %d steps of %d, device %s", len(images), tuple(images.shape[1:]), pc.steps, pc.batch_size, device)

    losses = torch.zeros(pc.steps, device=device)
    writer = tensorboard_writer(cfg)
    start = time.perf_counter()
    bar = tqdm(range(pc.steps), desc="pretrain", dynamic_ncols=True)
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
        ema_update(ema, model, min(pc.ema_decay, (1 + k) / (10 + k)))
        losses[k] = loss.detach()
        if (k + 1) % pc.log_every == 0 or k + 1 == pc.steps:
            window = losses[max(0, k + 1 - pc.log_every):k + 1].mean().item()
            bar.set_postfix(loss=f"{window:.4f}")
            if writer is not None:
                writer.add_scalar("pretrain/loss", window, k + 1)  # mean over the last log_every steps

    if writer is not None:
        writer.close()
    n10 = max(1, pc.steps // 10)
    first, last = losses[:n10].mean().item(), losses[-n10:].mean().item()
    seconds = time.perf_counter() - start
    path = save_model(ema, out_dir / f"ddpm.{pc.format}", cfg.model)
    metrics = {"steps": pc.steps, "loss_first_10pct": first, "loss_last_10pct": last, "seconds": seconds, "model": str(path)}
    atomic_write_text(json.dumps(metrics, indent=2), out_dir / "pretrain_metrics.json")
    log.info("pretrain loss: first 10%% of steps %.4f, last 10%% %.4f (%.1fs); EMA model saved to %s", first, last, seconds, path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return pretrain(config_from_args(args))
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
