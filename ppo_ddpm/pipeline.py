"""The embedded pipeline before PPO: procedural data -> pretrained DDPM -> reward model.

Each stage runs only when the config leaves its output empty (``model.pretrained``,
``reward.model_path`` when the reward needs a trained model; ``data.root`` when one of those two runs).
What a stage made is recorded in ``{output_dir}/pipeline.json``: its output path *relative to output_dir*
(so a moved run folder still finds it), its wall time and the config keys it depends on. A stage
whose recorded output exists and whose keys are unchanged is skipped; changed keys are refused
unless ``overwrite``. Before any stage runs, the outputs of the stages about to run are checked:
an existing one that pipeline.json does not record is overwritten only with ``resume`` (the stage
was interrupted; pretraining then continues from its checkpoint) or ``overwrite``.

    cfg = prepare(cfg)            # runs the missing stages, returns cfg with the paths filled in
    cfg = prepare(cfg, run=False) # only fills in recorded paths (eval); a missing one is an error
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config, config_to_dict, flatten, key_matches
from .utils.checkpoint import atomic_write_text, refuse_overwrite

STATE_FILE = "pipeline.json"


class PipelineError(RuntimeError):
    """A stage output the run needs is missing, or was made with another config."""


@dataclass(frozen=True)
class Stage:
    name: str
    needed: Callable[[Config], bool]  # does the config leave this stage's output empty?
    run: Callable[[Config, bool], str]  # (cfg, resume) -> make the output, return its path
    apply: Callable[[Config, str], None]  # write the path into the config
    outputs: Callable[[Config], list[Path]]  # the files the stage writes (never silently overwritten)
    keys: tuple[str, ...]  # config keys (a trailing "." is a prefix) the output depends on
    derived: Callable[[Config], dict] = lambda cfg: {}  # further values it depends on, recorded beside the keys


def _make_data(cfg: Config, resume: bool) -> str:
    from .data import resolve_data_root

    return str(resolve_data_root(cfg))


def _pretrain(cfg: Config, resume: bool) -> str:
    from .pretrain import pretrain

    return str(pretrain(cfg, resume=resume, overwrite=True))


def _train_reward(cfg: Config, resume: bool) -> str:
    from .train_reward_model import train_reward_model

    path, _held_out_accuracy = train_reward_model(cfg, overwrite=True)
    return str(path)


def _pretrain_outputs(cfg: Config) -> list[Path]:
    from .pretrain import checkpoint_dir, model_path

    return [model_path(cfg), checkpoint_dir(cfg) / "last.pt"]


def _set(section: str, key: str) -> Callable[[Config, str], None]:
    return lambda cfg, path: setattr(getattr(cfg, section), key, path)


def _needs_pretrain(cfg: Config) -> bool:
    return cfg.model.pretrained == ""


def _trained_reward_kind(cfg: Config) -> str | None:
    from .reward import trained_model_kind  # "model" (real-vs-fake CNN) or "classifier" (class folders)

    return trained_model_kind(cfg.reward)


def _needs_reward(cfg: Config) -> bool:
    return _trained_reward_kind(cfg) is not None


def _reward_outputs(cfg: Config) -> list[Path]:
    from .train_reward_model import output_path

    return [output_path(cfg)]


_DATA_KEYS = ("seed", "data.image_size", "data.procedural_count")
_MODEL_KEYS = _DATA_KEYS + ("model.sample_size", "model.in_channels", "model.base_channels", "model.channel_mults",
                            "model.num_res_blocks", "model.attention_resolutions", "model.dropout", "model.num_classes",
                            "schedule.", "pretrain.steps", "pretrain.batch_size", "pretrain.lr", "pretrain.ema_decay",
                            "pretrain.format")
_REWARD_KEYS = _MODEL_KEYS + ("sampling.", "reward.hidden_channels", "reward.train_steps", "reward.batch_size",
                              "reward.lr", "reward.held_out_fraction", "reward.num_fake")

STAGES = (
    Stage("data", lambda c: c.data.root == "" and (_needs_pretrain(c) or _needs_reward(c)), _make_data,
          _set("data", "root"), lambda c: [], _DATA_KEYS),
    Stage("pretrain", _needs_pretrain, _pretrain, _set("model", "pretrained"), _pretrain_outputs, _MODEL_KEYS),
    Stage("reward", _needs_reward, _train_reward, _set("reward", "model_path"), _reward_outputs, _REWARD_KEYS,
          lambda c: {"reward.trained_model_kind": _trained_reward_kind(c)}),
)


def _stage_config(cfg: Config, stage: Stage) -> dict:
    flat = flatten(config_to_dict(cfg))
    picked = {k: v for k, v in flat.items() if key_matches(k, stage.keys)}
    return {**picked, **stage.derived(cfg)}


def read_record(output_dir: str | Path) -> dict:
    """The stage record {stage: {"path", "seconds", "config"}} of a run directory ({} when none)."""
    path = Path(output_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: invalid JSON ({e}); delete it to rerun the pipeline stages") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return data


def recorded_path(output_dir: str | Path, done: dict) -> Path:
    """The output path of a record entry: relative paths are relative to ``output_dir``."""
    p = Path(done["path"])
    return p if p.is_absolute() else Path(output_dir) / p


def _relative(path: str, output_dir: str) -> str:
    """``path`` relative to ``output_dir`` when it lies inside it, else absolute."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))
    return rel if not rel.startswith(os.pardir) else os.path.abspath(path)


def _changed(stage: Stage, done: dict, cfg: Config) -> list[str]:
    """Keys whose value differs from the one the recorded output was made with."""
    now, then = _stage_config(cfg, stage), done.get("config")
    if then is None:
        return []
    return [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]


def prepare(cfg: Config, run: bool = True, stages: tuple[str, ...] = ("data", "pretrain", "reward"), *,
            resume: bool = False, overwrite: bool = False) -> Config:
    """Return a copy of ``cfg`` with the empty outputs of ``stages`` filled in (running them if ``run``).

    Prints one line per stage with its wall time, or that it was done earlier.
    """
    cfg = copy.deepcopy(cfg)
    out = Path(cfg.output_dir)
    record = read_record(out)
    todo = []
    for stage in STAGES:
        if stage.name not in stages or not stage.needed(cfg):
            continue
        done = record.get(stage.name)
        if done and recorded_path(out, done).exists():
            changed = _changed(stage, done, cfg)
            if not changed or not run:
                todo.append((stage, done))
                continue
            if not overwrite:
                raise PipelineError(
                    f"stage '{stage.name}' of {out / STATE_FILE} was made with other config values ({'; '.join(changed)}): "
                    "pass --overwrite to redo it, or choose another output_dir")
        elif not run:
            raise PipelineError(
                f"stage '{stage.name}' has no output in {out / STATE_FILE}; "
                "run `python -m ppo_ddpm.finetune` with this config first or set the path in the config"
            )
        todo.append((stage, None))
    if run and not (resume or overwrite):  # before any stage runs: nothing unrecorded is overwritten
        refuse_overwrite([p for stage, done in todo if done is None for p in stage.outputs(cfg)])
    for stage, done in todo:
        if done is not None:
            path = str(recorded_path(out, done))
            stage.apply(cfg, path)
            if run:
                print(f"[pipeline] {stage.name}: done earlier ({done['seconds']:.1f} s) -> {path}", flush=True)
            continue
        print(f"[pipeline] {stage.name}: running", flush=True)
        t0 = time.perf_counter()
        path = stage.run(cfg, resume)
        seconds = time.perf_counter() - t0
        record[stage.name] = {"path": _relative(path, cfg.output_dir), "seconds": seconds,
                              "config": _stage_config(cfg, stage)}
        stage.apply(cfg, path)
        atomic_write_text(json.dumps(record, indent=2), out / STATE_FILE)
        print(f"[pipeline] {stage.name}: {seconds:.1f} s -> {path}", flush=True)
    return cfg
