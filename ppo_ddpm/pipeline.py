"""The embedded pipeline before PPO: procedural data -> pretrained DDPM -> reward model.

Each stage runs only when the config leaves its output empty (``model.pretrained``,
``reward.model_path`` when the reward needs a trained model; ``data.root`` when one of those two
runs). What a stage made is recorded in ``{output_dir}/pipeline.json`` (path and wall time); a stage whose recorded output
still exists is skipped, so a resumed run does not redo it.

    cfg = prepare(cfg)            # runs the missing stages, returns cfg with the paths filled in
    cfg = prepare(cfg, run=False) # only fills in recorded paths (eval); a missing one is an error
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config
from .utils.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"


class PipelineError(RuntimeError):
    """A stage output the run needs is missing."""


@dataclass(frozen=True)
class Stage:
    name: str
    needed: Callable[[Config], bool]  # does the config leave this stage's output empty?
    run: Callable[[Config], str]  # make the output, return its path
    apply: Callable[[Config, str], None]  # write the path into the config


def _make_data(cfg: Config) -> str:
    from .data import make_procedural_dataset

    return str(make_procedural_dataset(Path(cfg.output_dir) / "data", cfg.data.procedural_count, cfg.data.image_size, cfg.seed))


def _pretrain(cfg: Config) -> str:
    from .pretrain import pretrain

    return str(pretrain(cfg))


def _train_reward(cfg: Config) -> str:
    from .train_reward_model import train_reward_model

    path, _held_out_accuracy = train_reward_model(cfg)
    return str(path)


def _set(section: str, key: str) -> Callable[[Config, str], None]:
    return lambda cfg, path: setattr(getattr(cfg, section), key, path)


def _needs_pretrain(cfg: Config) -> bool:
    return cfg.model.pretrained == ""


def _needs_reward(cfg: Config) -> bool:
    from .reward import trained_model_kind  # "model" (real-vs-fake CNN) or "classifier" (class folders)

    return trained_model_kind(cfg.reward) is not None


STAGES = (
    Stage("data", lambda c: c.data.root == "" and (_needs_pretrain(c) or _needs_reward(c)), _make_data, _set("data", "root")),
    Stage("pretrain", _needs_pretrain, _pretrain, _set("model", "pretrained")),
    Stage("reward", _needs_reward, _train_reward, _set("reward", "model_path")),
)


def read_record(output_dir: str | Path) -> dict:
    """The stage record {stage: {"path", "seconds"}} of a run directory ({} when none)."""
    path = Path(output_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: invalid JSON ({e}); delete it to rerun the pipeline stages") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return data


def prepare(cfg: Config, run: bool = True, stages: tuple[str, ...] = ("data", "pretrain", "reward")) -> Config:
    """Return a copy of ``cfg`` with the empty outputs of ``stages`` filled in (running them if ``run``).

    Prints one line per stage with its wall time, or that it was skipped.
    """
    cfg = copy.deepcopy(cfg)
    record = read_record(cfg.output_dir)
    for stage in STAGES:
        if stage.name not in stages or not stage.needed(cfg):
            continue
        done = record.get(stage.name)
        if done and Path(done["path"]).exists():
            stage.apply(cfg, done["path"])
            if run:
                print(f"[pipeline] {stage.name}: done earlier ({done['seconds']:.1f} s) -> {done['path']}", flush=True)
            continue
        if not run:
            raise PipelineError(
                f"stage '{stage.name}' has no output in {Path(cfg.output_dir) / STATE_FILE}; "
                "run `python -m ppo_ddpm.finetune` with this config first or set the path in the config"
            )
        print(f"[pipeline] {stage.name}: running", flush=True)
        t0 = time.perf_counter()
        path = stage.run(cfg)
        seconds = time.perf_counter() - t0
        stage.apply(cfg, path)
        record[stage.name] = {"path": path, "seconds": seconds}
        atomic_write_text(json.dumps(record, indent=2), Path(cfg.output_dir) / STATE_FILE)
        print(f"[pipeline] {stage.name}: {seconds:.1f} s -> {path}", flush=True)
    return cfg
