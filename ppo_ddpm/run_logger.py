"""Rank-0 sinks of one PPO run: ``metrics.jsonl``, TensorBoard scalars and sample grids."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import Config


class RunLogger:
    """Rank-0 sinks of one run: metrics.jsonl, TensorBoard scalars and sample grids."""

    def __init__(self, cfg: Config, start: int, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.out = Path(cfg.output_dir)
        self.writer = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.out / "metrics.jsonl", "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=start)

    def log(self, iteration: int, stats: dict) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, **{k: float(v) for k, v in stats.items()}}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.writer is not None and (iteration + 1) % max(1, self.cfg.logging.log_every) == 0:
            for k, v in row.items():
                if k != "iteration":
                    self.writer.add_scalar(f"ppo/{k}", v, iteration)

    def grid(self, iteration: int, x0: torch.Tensor) -> None:
        if not self.enabled:
            return
        from PIL import Image

        from .data import save_grid

        path = save_grid(x0.float().cpu(), self.out / "samples" / f"iter_{iteration + 1:06d}.png", nrow=4)
        if self.writer is not None:
            self.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), iteration, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.writer is not None:
                self.writer.close()
