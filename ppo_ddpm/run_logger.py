"""TensorBoard and file sinks of a run.

- :func:`tensorboard_writer`: the ``{output_dir}/tb`` SummaryWriter every stage writes to (None when
  ``logging.tensorboard`` is off), tags ``pretrain/``, ``reward_model/``, ``ppo/``, ``eval/``;
- :func:`log_config`: the resolved config as YAML text and as TensorBoard hparams;
- :class:`RunLogger`: rank-0 sinks of the PPO run: ``metrics.jsonl``, scalars, reward and advantage
  histograms, sample grids (PNG, and an image tensor >= 256 px across).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from .config import Config, config_to_dict, flatten

GRID_WIDTH = 256  # sample grids are enlarged (nearest) to at least this many pixels across
HPARAM_METRICS = ("ppo/reward_mean", "eval/reward_gain", "eval/win_rate", "eval/kl_drift_total")


def tensorboard_writer(cfg: Config, purge_step: int | None = None):
    """SummaryWriter on ``{output_dir}/tb`` or None when ``logging.tensorboard`` is false."""
    if not cfg.logging.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(cfg.output_dir) / "tb"), purge_step=purge_step)


def log_config(writer, cfg: Config) -> None:
    """The config as YAML text (tag ``config``) and as hparams (every key; lists and null as text),
    linked to the metrics HPARAM_METRICS that the run writes as scalars."""
    from torch.utils.tensorboard.summary import hparams

    data = config_to_dict(cfg)
    text = yaml.safe_dump(data, sort_keys=False)
    writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)  # a markdown code block
    hp = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(data).items()}
    for summary in hparams(hp, {m: float("nan") for m in HPARAM_METRICS}):
        writer.file_writer.add_summary(summary)


class RunLogger:
    """Rank-0 sinks of one PPO run (module docstring); ``start``: the first iteration (resume)."""

    def __init__(self, cfg: Config, start: int, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.out = Path(cfg.output_dir)
        self.writer = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.out / "metrics.jsonl", "a")
        self.writer = tensorboard_writer(cfg, purge_step=start)
        if self.writer is not None and start == 0:
            log_config(self.writer, cfg)

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

    def histograms(self, iteration: int, rewards: torch.Tensor, advantages: torch.Tensor) -> None:
        """This rank's batch of rewards and advantages [B] as TensorBoard histograms (finite values)."""
        if self.writer is None or (iteration + 1) % max(1, self.cfg.logging.log_every):
            return
        for tag, v in (("ppo/rewards", rewards), ("ppo/advantages", advantages)):
            v = v.detach().float().cpu()
            v = v[torch.isfinite(v)]
            if v.numel():  # linear bins: TensorBoard's default buckets end at 1e20 and drop larger rewards
                self.writer.add_histogram(tag, v, iteration, bins=20)

    def grid(self, iteration: int, x0: torch.Tensor) -> None:
        """Samples x0 [B, 3, H, W] in [-1, 1], 4 per row: ``samples/iter_*.png`` and the TensorBoard image
        ``samples``, both enlarged to >= GRID_WIDTH px (the array itself is logged, not a re-read PNG); and
        their quality curves ``quality/{diversity,grain,saturation}`` (``ppo_ddpm.quality.image_stats``:
        the same noise every time, so the curves show drift, collapse and noise textures as they happen)."""
        if not self.enabled:
            return
        from .data import make_grid, save_png
        from .plots import upscale
        from .quality import image_stats

        grid = upscale(make_grid(x0.float().cpu(), nrow=4), GRID_WIDTH)
        save_png(grid, self.out / "samples" / f"iter_{iteration + 1:06d}.png")
        if self.writer is not None:
            self.writer.add_image("samples", grid, iteration, dataformats="HWC")
            if bool(torch.isfinite(x0).all()):
                stats = image_stats(x0)
                for k in ("diversity", "grain", "saturation"):
                    self.writer.add_scalar(f"quality/{k}", stats[k], iteration)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.writer is not None:
                self.writer.close()
