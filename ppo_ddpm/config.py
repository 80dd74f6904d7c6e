"""Typed configuration: dataclasses loaded from YAML, overridden from the command line.

The dataclass defaults *are* the embedded default (the CPU smoke run); ``configs/smoke.yaml``
spells the same values out and ``configs/default.yaml`` is the GPU-sized run.

    cfg = load_config("configs/default.yaml", overrides=["ppo.clip_range=0.1"])

An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key
(``ppo.clip_range``) and the file it came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key and the source."""


@dataclass
class ModelConfig:
    """UNet size. ``pretrained`` is a ``ddpm.pth`` / ``.safetensors`` file or a diffusers folder."""

    sample_size: int = 16
    in_channels: int = 3
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0
    num_classes: int = 0  # 0: unconditional
    pretrained: str = ""
    # what the network outputs (diffusers' name); stored with the weights, read from a diffusers folder
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"


@dataclass
class ScheduleConfig:
    """Training noise schedule beta_1..beta_T (DDPM, Ho et al. 2020; cosine: Nichol & Dhariwal 2021;
    scaled_linear: Stable Diffusion's). With a diffusers folder in ``model.pretrained`` the keys not set
    in the YAML follow its scheduler_config.json (``ppo_ddpm.ddpm.diffusers_scheduler``)."""

    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class SamplingConfig:
    """DDIM sampler (Song et al. 2021): eta=0 deterministic, eta=1 DDPM-like variance."""

    num_inference_steps: int = 10
    eta: float = 1.0
    spacing: Literal["leading", "trailing", "linspace"] = "leading"
    clip_x0: Optional[float] = 1.0  # clamp predicted x_0 to [-c, c]; null: off
    set_alpha_to_one: bool = True  # abar_prev of the last step is 1 (else abar_0)
    steps_offset: int = 0  # added to the ``leading`` timesteps (diffusers' steps_offset)


@dataclass
class DataConfig:
    """Image data. ``root`` empty: a procedural dataset is made under ``output_dir``."""

    root: str = ""
    image_size: int = 16
    procedural_count: int = 512


@dataclass
class PretrainConfig:
    """Epsilon-prediction pretraining of the DDPM."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    ema_decay: float = 0.99
    format: Literal["pth", "safetensors"] = "pth"
    log_every: int = 50


RewardKind = Literal["model", "jpeg_compressibility", "jpeg_incompressibility", "classifier", "random", "plugin"]
ModelOutput = Literal["log_odds", "log_p_real"]


@dataclass
class RewardTermConfig:
    """One term of ``reward.terms``: ``weight`` times the reward ``kind`` (keys as in RewardConfig;
    an empty ``model_path`` uses ``reward.model_path``; ``name`` is the log name, default the kind)."""

    kind: RewardKind = "model"
    weight: float = 1.0
    model_path: str = ""
    model_output: ModelOutput = "log_odds"
    target_class: int = 1
    function: str = ""
    name: str = ""


@dataclass
class RewardConfig:
    """The frozen reward scoring x_0.

    kind: ``model`` (a trained real-vs-fake CNN at ``model_path``), ``jpeg_compressibility``,
    ``jpeg_incompressibility``, ``classifier`` (log p(target_class | x_0) of a CNN trained on the
    class folders ``data.root/<class>/`` at ``model_path``), ``random`` (the random-reward control) or
    ``plugin`` (``function`` = ``module:function``).
    ``terms`` non-empty: the reward is sum_k weight_k r_k of its terms instead (``kind``,
    ``target_class`` and ``function`` are then not used), each term logged on its own.
    """

    kind: RewardKind = "model"
    model_path: str = ""
    model_output: ModelOutput = "log_odds"  # kind model: logit_real - logit_fake, or log p(real)
    target_class: int = 1
    function: str = ""
    terms: list[RewardTermConfig] = field(default_factory=list)
    # reward-model training (python -m ppo_ddpm.train_reward_model)
    hidden_channels: int = 16
    train_steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    held_out_fraction: float = 0.2
    num_fake: int = 512  # fakes sampled from the base DDPM when data has no fake/ folder


@dataclass
class PPOConfig:
    """PPO on whole DDIM trajectories.

    objective ``trajectory``: r = prod_t r_t over the stochastic steps, log r_t per-step clipped, the
    sum globally clipped, PPO min-form loss. ``per_step``: DDPO's estimator (a PPO ratio per step).
    log_prob_reduction: per-step log-probs summed over pixels (``sum``, the density) or averaged
    (``mean``, DDPO). grad_mask: ``strict`` (gradient only for samples where nothing was clipped) or
    ``ppo`` (standard PPO: autograd of the min form). sigma_floor: the policy's std is
    s_t = max(sigma_t, sigma_floor) when scoring; with sample_at_floor the sampler draws with it too.
    kl_beta: weight of the KL to the base model, per step as the objective weighs that step's log-ratio.
    """

    objective: Literal["trajectory", "per_step"] = "trajectory"
    log_prob_reduction: Literal["sum", "mean"] = "sum"
    grad_mask: Literal["strict", "ppo"] = "strict"
    iterations: int = 20
    batch_size: int = 32  # rollouts per iteration (per rank)
    num_epochs: int = 1
    num_minibatches: int = 1
    microbatch: int = 32
    clip_range: float = 0.2
    per_step_clip: Optional[float] = 1.0
    global_clip: Optional[float] = 5.0
    sigma_floor: float = 1e-2
    sample_at_floor: bool = False
    adv_clip: Optional[float] = 5.0
    advantage: Literal["global", "group"] = "global"
    group_buffer_size: int = 32
    group_min_count: int = 16
    grad_clip: Optional[float] = 1.0
    lr: float = 2e-4  # smoke: 5e-4 reward-hacks the real-vs-fake CNN into noise textures
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # 0: off
    kl_beta: float = 0.0
    timestep_fraction: float = 1.0
    train_last_k: int = 0  # 0: all steps
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    cuda_graphs: bool = True
    use_kernels: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = 1
    sample_every: int = 10
    ckpt_every: int = 10


@dataclass
class EvalConfig:
    num_samples: int = 64
    batch_size: int = 64
    seed: int = 1234


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/smoke"
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass  # try the next member; none fits -> one error naming the whole union
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' expects a float, got {value!r}")
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            raise ConfigError(f"{source}: key '{key}' expects {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}' has unsupported type {_type_name(tp)}")


def _from_dict(cls: type, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key, source)
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a nested mapping; missing keys keep their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return _from_dict(Config, data, "", source)


def _set_nested(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: key '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (values parsed as YAML scalars) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set '{item}': cannot parse value: {e}") from None
        _set_nested(data, key.strip(), value, "--set")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the embedded default when None), then apply ``overrides``; with a diffusers folder in
    ``model.pretrained`` the keys left unset follow its scheduler_config.json (``ddpm.diffusers_scheduler``)."""
    data: dict = {}
    source = "<embedded default>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    if overrides:
        source = f"{source} + --set"
        data = apply_overrides(data, overrides)
    from .ddpm.diffusers_scheduler import apply_pretrained_scheduler  # a diffusers folder brings its scheduler config

    return apply_pretrained_scheduler(config_from_dict(data, source), data, source)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cfg", default=None, help="YAML config (default: the embedded smoke config)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set ppo.clip_range=0.1 (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.cfg, args.overrides)
