"""Typed configuration: dataclasses loaded from YAML, overridden from the command line, validated.

The dataclass defaults *are* the embedded default (the CPU smoke run); ``configs/smoke.yaml``
spells the same values out and ``configs/default.yaml`` is the GPU-sized run.

    cfg = load_config("configs/default.yaml", overrides=["ppo.clip_range=0.1"], validate=True)

Loading: an unknown key or a value of the wrong type raises :class:`ConfigError` naming the key
(``ppo.clip_range``) and the file it came from. Floats may be written ``1e-4`` as well as
``1.0e-4`` (YAML 1.2 style; plain YAML 1.1 reads ``1e-4`` as a string), in files and in ``--set``.

Validation (:func:`validate_config`, run by every CLI before any stage) checks every value
against the rules declared beside the fields, and raises one ConfigError listing each violation
as ``<origin>: <key> = <value>: <problem>``, where origin is the file, ``--set`` or ``default``:

- a per-field rule is the field's metadata, made by :func:`rule`: bounds ``ge / gt / le / lt``
  (applied to each element of a list; ``None`` of an Optional field always passes), ``nonempty``,
  and ``check``, a function ``value -> problem | None``::

      lr: float = rule(2e-4, gt=0)
      channel_mults: list[int] = rule([1, 2], ge=1, nonempty=True)

- a rule over several fields is a :class:`Check` in the ``RULES`` tuple of the dataclass that holds
  them (keys relative to it; ``Config.RULES`` relates sections with dotted keys). Its function
  gets the keys' values in order and returns a problem or None::

      RULES: ClassVar[tuple] = (
          Check(("batch_size", "num_minibatches"),
                lambda b, m: need(b % m == 0, "ppo.batch_size must be a multiple of ppo.num_minibatches")),
      )

  A Check runs only when its keys passed their own field rules. Every float must be finite.

To add a field: declare it with ``rule(default, ...)`` (a plain default means "no rule"), add it to
``configs/smoke.yaml`` (tests check that file spells out every key), and add a Check for any
relation to other fields. Checks that touch the file system (``output_dir``, ``data.root``,
``model.pretrained``, the reward model's image size) or the machine (``device``) live here too,
so a bad run fails before its first stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the key, the value and the source."""


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A per-field rule (see the module docstring); ``problems(value)`` lists what is wrong with a value."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    nonempty: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None

    def _bounds(self) -> str:
        def num(v: float) -> str:  # 9223372036854775808 -> 2^63
            return f"2^{int(v).bit_length() - 1}" if isinstance(v, int) and v >= 2**32 and v & (v - 1) == 0 else str(v)

        lo = f"[{num(self.ge)}" if self.ge is not None else f"({num(self.gt)}" if self.gt is not None else None
        hi = f"{num(self.le)}]" if self.le is not None else f"{num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"must be in {lo}, {hi}"
        return f"must be {'>=' if self.ge is not None else '>'} {lo[1:]}" if lo else f"must be {'<=' if self.le is not None else '<'} {hi[:-1]}"

    def _in_bounds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def problems(self, value: Any) -> list[str]:
        if value is None:
            return []
        out = []
        if self.nonempty and len(value) == 0:
            out.append("must not be empty")
        if any(b is not None for b in (self.ge, self.gt, self.le, self.lt)):
            items = value if isinstance(value, list) else [value]
            if not all(self._in_bounds(v) for v in items):
                out.append(("every element " if isinstance(value, list) else "") + self._bounds())
        if self.check is not None and not out:
            problem = self.check(value)
            if problem:
                out.append(problem)
        return out


def rule(default: Any, *, ge=None, gt=None, le=None, lt=None, nonempty: bool = False,
         check: Optional[Callable[[Any], Optional[str]]] = None):
    """A dataclass field with ``default`` and a :class:`Rule` in its metadata (lists get a default_factory)."""
    meta = {"rule": Rule(ge, gt, le, lt, nonempty, check)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Check:
    """A rule over several fields: ``problem(*values of keys) -> str | None``; ``show``: the keys to
    print with a violation (default ``keys``)."""

    keys: tuple[str, ...]
    problem: Callable[..., Optional[str]]
    show: Optional[tuple[str, ...]] = None


def need(ok: bool, problem: str) -> Optional[str]:
    """``None`` when ``ok``, else ``problem`` (the body of most checks)."""
    return None if ok else problem


def device_problem(name: str) -> Optional[str]:
    """What is wrong with the device string ``name`` on this machine, or None."""
    if name == "auto":
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "expected auto, cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} is not supported; expected auto, cpu, cuda or cuda:N"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (use device: cpu or auto)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def _bf16_problem(precision: str, device: str) -> Optional[str]:
    """bf16 autocast on a CUDA device needs bfloat16 support (compute capability >= 8.0); CPU autocast has it."""
    if precision != "bf16":
        return None
    import torch

    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if torch.device(name).type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    return (f"ppo.precision bf16 needs a GPU with bfloat16 support (compute capability >= 8.0); "
            f"{torch.cuda.get_device_name(torch.device(name))} has none: use ppo.precision fp32")


def _output_dir_problem(path: str) -> Optional[str]:
    if path.strip() == "":
        return "must name a folder (an empty output_dir would write into the current folder)"
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return need(p.is_dir(), f"{p} exists and is not a folder")
    return None


def _existing(kind: str) -> Callable[[str], Optional[str]]:
    def problem(path: str) -> Optional[str]:
        if path == "":
            return None
        p = Path(path)
        if not p.exists():
            return f"{kind} not found"
        return need(p.is_dir() if kind == "folder" else True, f"{p} is not a folder")

    return problem


def _attention_problem(size: int, mults: list[int], attention: list[int]) -> Optional[str]:
    resolutions = [size // 2**i for i in range(len(mults))]
    unused = sorted(set(attention) - set(resolutions))
    return need(not unused, f"model.attention_resolutions {unused} match no UNet resolution {resolutions}")


def _plugin_problem(kind: str, function: str) -> Optional[str]:
    if kind != "plugin":
        return None
    from .reward.plugin import load_plugin
    from .reward.base import RewardError

    try:
        load_plugin(function)
    except RewardError as e:
        return str(e)
    return None


def _reward_model_problem(kind: str, path: str, sample_size: int, in_channels: int, data_root: str,
                          path_key: str = "reward.model_path") -> Optional[str]:
    """A reward CNN file must score images of the model's size (read from its metadata only); an empty
    path is trained by the pipeline (``reward.trained_model_kind``): a classifier then needs class folders."""
    if kind not in ("model", "classifier"):
        return None
    if path == "":
        return need(kind == "model" or data_root != "",
                    f"a classifier reward needs {path_key} (a classifier CNN file) or the class folders "
                    "data.root/<class>/ to train one on (data.root is empty)")
    if not Path(path).is_file():
        return f"{path_key}: file not found"
    from .reward.model import read_reward_model_config

    stored = read_reward_model_config(path)
    if stored is None:
        return None  # not a readable reward model: build_reward reports it
    size, channels = stored.get("image_size"), stored.get("in_channels")
    if (size, channels) != (sample_size, in_channels):
        return (f"the reward model {path} scores images of {channels}x{size}x{size} but the model makes "
                f"{in_channels}x{sample_size}x{sample_size}; train the reward model at model.sample_size={sample_size}")
    return None


def _label_target_problem(kind: str, target_class: int, num_classes: int) -> Optional[str]:
    return need(kind != "classifier" or target_class >= 0 or num_classes > 0,
                "target_class < 0 scores each sample's class label, but the model is unconditional")


def _unless(skip: Callable[[Any], bool], problem: Callable[..., Optional[str]]) -> Callable[..., Optional[str]]:
    """``problem`` of all values but the last, skipped when ``skip(last value)``: e.g. the single reward's
    checks when ``reward.terms`` replaces it, our UNet's when ``model.pretrained`` is a diffusers folder."""
    return lambda *values: None if skip(values[-1]) else problem(*values[:-1])


def _is_folder(path: str) -> bool:
    """A diffusers folder in ``model.pretrained`` brings its own UNet2DModel architecture."""
    return path != "" and Path(path).is_dir()


def _terms_problem(reward: "RewardConfig", sample_size: int, in_channels: int, num_classes: int,
                   data_root: str) -> Optional[str]:
    """Each of ``reward.terms`` checked as the single reward is (its model_path defaulting to
    ``reward.model_path``), plus a finite weight and unique names."""
    if not reward.terms:
        return None
    from .reward.base import RewardError
    from .reward.terms import term_names, trained_model_kind

    problems = []
    try:
        trained_model_kind(reward)
    except RewardError as e:
        problems.append(str(e))
    names = term_names(reward)
    if len(set(names)) != len(names):
        problems.append(f"term names must be unique, got {names}; give each a 'name'")
    for i, (name, t) in enumerate(zip(names, reward.terms)):
        path_key = f"reward.terms[{i}].model_path" if t.model_path else "reward.model_path"
        for problem in (need(math.isfinite(t.weight), "weight must be a finite number"),
                        _plugin_problem(t.kind, t.function),
                        _label_target_problem(t.kind, t.target_class, num_classes),
                        _reward_model_problem(t.kind, t.model_path or reward.model_path, sample_size, in_channels,
                                              data_root, path_key)):
            if problem:
                problems.append(f"reward.terms[{i}] ({name}): {problem}")
    return "; ".join(problems) or None


def _policy_steps_problem(ppo: "PPOConfig", sampling: "SamplingConfig", schedule: "ScheduleConfig") -> Optional[str]:
    """The DDIM plan must have stochastic steps (the policy's actions; ``ppo.sample_at_floor`` raises every
    sigma to ``ppo.sigma_floor``), and ``ppo.train_last_k`` may train at most that many (the trainer's own
    view: ``ppo.rollout.check_policy_steps``)."""
    from types import SimpleNamespace

    from .ddpm.ddim import DDIMPlan
    from .ppo.rollout import check_policy_steps

    try:  # ConfigError (no stochastic step) or ValueError (timesteps outside the schedule: sampling.steps_offset)
        steps = check_policy_steps(DDIMPlan.from_config(SimpleNamespace(ppo=ppo, sampling=sampling, schedule=schedule)),
                                   ppo.sigma_floor)
    except ValueError as e:
        return str(e)
    return need(ppo.train_last_k <= len(steps),
                f"ppo.train_last_k must be <= {len(steps)}, the number of stochastic DDIM steps (the policy's actions)")


SEED_BOUND = 2**63  # seeds are offset (rank, batch index) and must stay non-negative int64


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """UNet size. ``pretrained`` is a ``ddpm.pth`` / ``.safetensors`` file or a diffusers folder (whose
    config.json then gives sample_size, in_channels and num_classes, unless the YAML sets them)."""

    sample_size: int = rule(16, ge=1)
    in_channels: int = rule(3, check=lambda c: need(c == 3, "must be 3: image folders and rewards are RGB"))
    base_channels: int = rule(32, ge=1)
    channel_mults: list[int] = rule([1, 2], ge=1, nonempty=True)
    num_res_blocks: int = rule(1, ge=1)
    attention_resolutions: list[int] = rule([8], ge=1)
    dropout: float = rule(0.0, ge=0, lt=1)
    num_classes: int = rule(0, ge=0)  # 0: unconditional
    pretrained: str = rule("", check=_existing("file or folder"))
    # what the network outputs (diffusers' name); stored with the weights, read from a diffusers folder
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"

    RULES: ClassVar[tuple] = (
        Check(("sample_size", "channel_mults", "pretrained"), _unless(_is_folder, lambda s, m: need(
            s % 2 ** (len(m) - 1) == 0, "model.sample_size must be divisible by 2^(len(model.channel_mults) - 1)")),
              show=("sample_size", "channel_mults")),
        Check(("sample_size", "channel_mults", "attention_resolutions", "pretrained"), _unless(_is_folder, _attention_problem),
              show=("sample_size", "channel_mults", "attention_resolutions")),
    )


@dataclass
class ScheduleConfig:
    """Training noise schedule beta_1..beta_T (DDPM, Ho et al. 2020; cosine: Nichol & Dhariwal 2021;
    scaled_linear: Stable Diffusion's). With a diffusers folder in ``model.pretrained`` the keys not set
    in the YAML follow its scheduler_config.json (``ppo_ddpm.ddpm.diffusers_config``)."""

    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_train_timesteps: int = rule(1000, ge=1)
    beta_start: float = rule(1e-4, gt=0, lt=1)
    beta_end: float = rule(0.02, gt=0, lt=1)

    RULES: ClassVar[tuple] = (
        Check(("beta_start", "beta_end"), lambda a, b: need(a <= b, "schedule.beta_start must be <= schedule.beta_end")),
    )


@dataclass
class SamplingConfig:
    """DDIM sampler (Song et al. 2021): eta=0 deterministic, eta=1 DDPM-like variance."""

    num_inference_steps: int = rule(10, ge=1)
    eta: float = rule(1.0, ge=0, le=1)
    spacing: Literal["leading", "trailing", "linspace"] = "leading"
    clip_x0: Optional[float] = rule(1.0, gt=0)  # clamp predicted x_0 to [-c, c]; null: off
    set_alpha_to_one: bool = True  # abar_prev of the last step is 1 (else abar_0)
    steps_offset: int = rule(0, ge=0)  # added to the ``leading`` timesteps (diffusers' steps_offset)


@dataclass
class DataConfig:
    """Image data. ``root`` empty: a procedural dataset is made under ``output_dir``."""

    root: str = rule("", check=_existing("folder"))
    image_size: int = rule(16, ge=1)
    procedural_count: int = rule(512, ge=1)


@dataclass
class PretrainConfig:
    """Epsilon-prediction pretraining of the DDPM; a resumable checkpoint every ``ckpt_every`` steps."""

    steps: int = rule(300, ge=1)
    batch_size: int = rule(32, ge=1)
    lr: float = rule(2e-3, gt=0)
    ema_decay: float = rule(0.99, ge=0, lt=1)
    format: Literal["pth", "safetensors"] = "pth"
    log_every: int = rule(50, ge=1)
    ckpt_every: int = rule(100, ge=1)


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
    model_output: ModelOutput = "log_p_real"  # kind model: log p(real) (bounded), or logit_real - logit_fake
    target_class: int = 1
    function: str = ""
    terms: list[RewardTermConfig] = field(default_factory=list)
    # reward-model training (python -m ppo_ddpm.train_reward_model)
    hidden_channels: int = rule(16, ge=1)
    train_steps: int = rule(300, ge=1)
    batch_size: int = rule(64, ge=2)  # class-balanced: at least one image per class
    lr: float = rule(2e-3, gt=0)
    held_out_fraction: float = rule(0.2, gt=0, lt=1)
    num_fake: int = rule(512, ge=1)  # fakes sampled from the base DDPM when data has no fake/ folder

    RULES: ClassVar[tuple] = (
        Check(("kind", "function", "terms"), _unless(bool, _plugin_problem), show=("kind", "function")),
    )


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
    iterations: int = rule(40, ge=0)
    batch_size: int = rule(32, ge=1)  # rollouts per iteration (per rank)
    num_epochs: int = rule(2, ge=1)  # 2 x 2: three of the four updates per batch run off-policy (r != 1)
    num_minibatches: int = rule(2, ge=1)
    microbatch: int = rule(32, ge=1)
    clip_range: float = rule(0.2, gt=0)
    per_step_clip: Optional[float] = rule(1.0, gt=0)
    global_clip: Optional[float] = rule(5.0, gt=0)
    sigma_floor: float = rule(0.1, ge=0)  # down-weights near-deterministic steps (docs/objective.md)
    sample_at_floor: bool = False
    adv_clip: Optional[float] = rule(5.0, gt=0)
    advantage: Literal["global", "group"] = "global"
    group_buffer_size: int = rule(32, ge=1)
    group_min_count: int = rule(16, ge=0)
    grad_clip: Optional[float] = rule(1.0, gt=0)
    lr: float = rule(2e-5, gt=0)  # with the summed (density) ratio: clip fraction ~0.36 (docs/objective.md)
    lr_warmup_steps: int = rule(16, ge=0)  # step k (from 0) at lr * min(1, (k + 1) / this); 16: the first 4 iterations
    weight_decay: float = rule(0.0, ge=0)
    ema_decay: float = rule(0.0, ge=0, lt=1)  # 0: off
    kl_beta: float = rule(0.0, ge=0)
    timestep_fraction: float = rule(1.0, gt=0, le=1)
    train_last_k: int = rule(0, ge=0)  # 0: all steps
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    precision: Literal["fp32", "bf16"] = "fp32"  # the UNet's forward/backward (bf16: autocast); log-probs stay fp32/fp64
    tf32: bool = True  # CUDA, precision fp32: TF32 tensor cores for the UNet's convs/matmuls (false: exact fp32)
    channels_last: bool = False  # CUDA: the UNet's weights and inputs in NHWC format (no effect on CPU)
    cuda_graphs: bool = True  # CUDA: rollout, ratio pass and with-grad micro-batch step captured in graphs
    use_kernels: bool = True

    RULES: ClassVar[tuple] = (
        Check(("batch_size", "num_minibatches"), lambda b, m: need(
            b % m == 0, "ppo.batch_size must be a multiple of ppo.num_minibatches")),
        Check(("group_min_count", "group_buffer_size"), lambda c, n: need(
            c <= n, "ppo.group_min_count must be <= ppo.group_buffer_size")),
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = rule(1, ge=1)
    sample_every: int = rule(10, ge=0)  # 0: no sample grids
    ckpt_every: int = rule(10, ge=1)


@dataclass
class EvalConfig:
    num_samples: int = rule(64, ge=1)
    batch_size: int = rule(64, ge=1)
    seed: int = rule(1234, ge=0, lt=SEED_BOUND)


@dataclass
class Config:
    seed: int = rule(0, ge=0, lt=SEED_BOUND)
    device: str = rule("auto", check=device_problem)  # auto | cpu | cuda | cuda:N
    output_dir: str = rule("runs/smoke", check=_output_dir_problem)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    RULES: ClassVar[tuple] = (
        Check(("data.image_size", "model.sample_size"), lambda d, m: need(
            d == m, "data.image_size must equal model.sample_size (the reward scores the model's samples)")),
        Check(("data.root", "data.image_size"), lambda root, s: need(
            root != "" or s >= 4, "the procedural dataset (data.root empty) needs data.image_size >= 4")),
        Check(("model.num_classes", "data.root", "model.pretrained"), lambda n, root, pre: need(
            n == 0 or root != "" or pre != "",
            "a class-conditional model needs class folders data.root/<c>/ or data.root/real/<c>/ "
            "(the procedural dataset has no classes)")),
        Check(("sampling.num_inference_steps", "schedule.num_train_timesteps"), lambda n, T: need(
            n <= T, "sampling.num_inference_steps must be <= schedule.num_train_timesteps")),
        Check(("reward.kind", "reward.target_class", "model.num_classes", "reward.terms"),
              _unless(bool, _label_target_problem), show=("reward.kind", "reward.target_class", "model.num_classes")),
        Check(("reward.kind", "reward.model_path", "model.sample_size", "model.in_channels", "data.root", "reward.terms"),
              _unless(bool, _reward_model_problem),
              show=("reward.kind", "reward.model_path", "model.sample_size", "model.in_channels", "data.root")),
        Check(("reward", "model.sample_size", "model.in_channels", "model.num_classes", "data.root"), _terms_problem,
              show=("reward.terms", "reward.model_path")),
        Check(("ppo.precision", "device"), _bf16_problem),
        Check(("ppo", "sampling", "schedule"), _policy_steps_problem,
              show=("ppo.sigma_floor", "ppo.sample_at_floor", "ppo.train_last_k", "sampling.num_inference_steps",
                    "sampling.eta", "sampling.set_alpha_to_one", "sampling.steps_offset")),
    )


# --------------------------------------------------------------------------- validation


def get_dotted(obj: Any, dotted: str) -> Any:
    """The value of the dotted key ``dotted`` (``ppo.lr``) of a config object."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def flatten(data: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: leaf value}: ``{"ppo": {"lr": 1}} -> {"ppo.lr": 1}``."""
    out = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def key_matches(key: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted ``key`` is one of ``patterns`` or lies under one that ends with '.' (a section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _walk(obj: Any, prefix: str, found: list[tuple[tuple[str, ...], str]], bad: set[str],
          wanted: Callable[[str], bool]) -> None:
    """Append (keys, problem) for every field rule, non-finite float and Check of ``obj`` (sections first)
    over ``wanted`` keys; ``bad`` collects the keys found wrong so far."""
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _walk(value, key + ".", found, bad, wanted)
            continue
        if not wanted(key):
            continue
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            problems = ["must be a finite number"]
        else:
            r = f.metadata.get("rule")
            problems = r.problems(value) if r is not None else []
        for problem in problems:
            found.append(((key,), problem))
            bad.add(key)
    for check in getattr(type(obj), "RULES", ()):
        keys = [prefix + k for k in check.keys]
        if not all(wanted(k) for k in keys) or any(b == k or b.startswith(k + ".") for k in keys for b in bad):
            continue
        problem = check.problem(*(get_dotted(obj, k) for k in check.keys))
        if problem:
            found.append((tuple(prefix + k for k in (check.show or check.keys)), problem))
            bad.update(keys)  # later checks over these keys would only repeat the problem


def validate_config(cfg: Config, origins: Optional[dict[str, str]] = None,
                    sections: Optional[tuple[str, ...]] = None) -> Config:
    """Check every rule of ``cfg`` (see the module docstring); return ``cfg`` or raise one ConfigError.

    ``origins`` maps a dotted key to where its value came from (a file, ``--set``); other keys are
    ``default`` (or ``config`` when no origins are given: a Config built in code). ``sections``
    (e.g. ``("ppo", "sampling", "schedule")``): check only their fields, and the Checks within them.
    """
    def wanted(key: str) -> bool:
        return sections is None or any(key == s or key.startswith(s + ".") for s in sections)

    found: list[tuple[tuple[str, ...], str]] = []
    _walk(cfg, "", found, set(), wanted)
    if not found:
        return cfg
    fallback = "default" if origins is not None else "config"
    lines = []
    for keys, problem in found:
        where = list(dict.fromkeys((origins or {}).get(k, fallback) for k in keys))
        values = ", ".join(f"{k} = {get_dotted(cfg, k)!r}" for k in keys)
        lines.append(f"{', '.join(where)}: {values}: {problem}")
    if len(lines) == 1:
        raise ConfigError(lines[0])
    raise ConfigError(f"{len(lines)} invalid config values:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``3E+5`` (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-4``)."""
    return yaml.load(text, Loader=_Loader)


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
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set '{item}': cannot parse value: {e}") from None
        _set_nested(data, key.strip(), value, "--set")
    return data


def read_config_file(path: str | Path) -> dict:
    """The mapping of a YAML config file; a missing, unreadable, non-UTF-8 or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, validate: bool = False,
                sections: Optional[tuple[str, ...]] = None) -> Config:
    """Load ``path`` (or the embedded default when None), then apply ``overrides``; with a diffusers folder in
    ``model.pretrained`` the keys left unset follow its scheduler_config.json and config.json (``ddpm.diffusers_config``).
    With ``validate`` check every rule (of ``sections`` only, if given: see :func:`validate_config`), naming
    each bad value's file, ``--set`` or diffusers folder config."""
    data: dict = {}
    source = "<embedded default>"
    origins: dict[str, str] = {}
    if path is not None:
        source = str(path)
        data = read_config_file(path)
        origins = dict.fromkeys(flatten(data), str(path))
    if overrides:
        source = f"{source} + --set"
        data = apply_overrides(data, overrides)
        origins.update(dict.fromkeys(flatten(apply_overrides({}, overrides)), "--set"))
    from .ddpm.diffusers_config import apply_pretrained_folder  # a diffusers folder brings its scheduler and UNet configs

    cfg, from_folder = apply_pretrained_folder(config_from_dict(data, source), data, source)
    origins.update(dict.fromkeys(from_folder, f"{cfg.model.pretrained} (diffusers config)"))
    return validate_config(cfg, origins, sections) if validate else cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cfg", default=None, help="YAML config (default: the embedded smoke config)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set ppo.clip_range=0.1 (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace, sections: Optional[tuple[str, ...]] = None) -> Config:
    """The validated config of ``--cfg`` and ``--set`` (``sections``: only the keys a CLI uses, e.g. export)."""
    return load_config(args.cfg, args.overrides, validate=True, sections=sections)
