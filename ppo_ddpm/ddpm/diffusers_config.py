"""A diffusers folder's configs <-> our keys: its scheduler config <-> the ``schedule`` / ``sampling`` /
``model.prediction_type`` keys, and its UNet's config.json -> the ``model`` size keys.

    scheduler_config.json          our config key
    beta_schedule                  schedule.kind   (linear, scaled_linear; squaredcos_cap_v2 = cosine)
    num_train_timesteps            schedule.num_train_timesteps
    beta_start, beta_end           schedule.beta_start, schedule.beta_end
    prediction_type                model.prediction_type
    clip_sample, clip_sample_range sampling.clip_x0 (= clip_sample_range, or null when clip_sample is false)
    set_alpha_to_one               sampling.set_alpha_to_one
    steps_offset                   sampling.steps_offset
    timestep_spacing               sampling.spacing

    UNet config.json               our config key
    sample_size                    model.sample_size (and data.image_size, when the YAML leaves it out)
    in_channels                    model.in_channels
    num_class_embeds               model.num_classes (null = 0)

Reading (``model.pretrained`` is a diffusers folder, applied by ``config.load_config``): a key the
YAML / ``--set`` leaves out follows the folder (logged). A key they set explicitly:

- **model keys** (``schedule.*``, ``model.*``) must equal the folder's value, else a
  :class:`ConfigError` naming both: the network was trained with that schedule, output type and size,
  so another value would silently sample a different process (or fail at the first forward);
- **sampler keys** (``sampling.*``) are sampler choices: the YAML wins and the override is logged
  as a warning.

A config the DDIM step cannot follow (``trained_betas``, ``thresholding``, ``rescale_betas_zero_snr``,
another ``beta_schedule``) is a ConfigError naming the file and the key. Writing: :func:`ddim_scheduler_config`.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

from ..config import Config, ConfigError, flatten, get_dotted
from ..utils.checkpoint import CheckpointError, read_json

log = logging.getLogger(__name__)

SCHEDULE_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}  # diffusers -> ours
MODEL_KEYS = ("schedule.kind", "schedule.num_train_timesteps", "schedule.beta_start", "schedule.beta_end", "model.prediction_type",
              "model.sample_size", "model.in_channels", "model.num_classes")
SPACINGS = ("leading", "trailing", "linspace")


def find_scheduler_config(folder: str | Path) -> Path | None:
    """The scheduler_config.json of a diffusers folder: beside the UNet's config.json, in ``scheduler/`` of a
    pipeline folder, or in ``../scheduler/`` when ``folder`` is the ``unet/`` of a pipeline; None if absent."""
    folder = Path(folder)
    candidates = [folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"]
    if (folder.parent / "model_index.json").is_file():
        candidates.append(folder.parent / "scheduler" / "scheduler_config.json")
    return next((c for c in candidates if c.is_file()), None)


def scheduler_values(sc: dict, path: str | Path) -> dict[str, object]:
    """Our dotted config keys -> values, from a scheduler config dict (only the keys it holds)."""
    where = f"{path}"
    unsupported = {k: sc[k] for k in ("trained_betas", "thresholding", "rescale_betas_zero_snr") if sc.get(k)}
    if unsupported:
        raise ConfigError(f"{where}: {', '.join(f'{k}={v!r}' for k, v in unsupported.items())} is not supported by "
                          "ppo_ddpm's DDIM step (schedules: linear, scaled_linear, squaredcos_cap_v2)")
    out: dict[str, object] = {}
    if "beta_schedule" in sc:
        if sc["beta_schedule"] not in SCHEDULE_KINDS:
            raise ConfigError(f"{where}: beta_schedule={sc['beta_schedule']!r} is not supported "
                              f"(supported: {', '.join(SCHEDULE_KINDS)})")
        out["schedule.kind"] = SCHEDULE_KINDS[sc["beta_schedule"]]
    for ours, theirs, tp in (("schedule.num_train_timesteps", "num_train_timesteps", int), ("schedule.beta_start", "beta_start", float),
                             ("schedule.beta_end", "beta_end", float), ("sampling.set_alpha_to_one", "set_alpha_to_one", bool),
                             ("sampling.steps_offset", "steps_offset", int), ("model.prediction_type", "prediction_type", str)):
        if theirs in sc:
            out[ours] = tp(sc[theirs])
    if out.get("model.prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise ConfigError(f"{where}: prediction_type={out['model.prediction_type']!r} is not supported (epsilon, sample, v_prediction)")
    if "clip_sample" in sc:
        out["sampling.clip_x0"] = float(sc.get("clip_sample_range", 1.0)) if sc["clip_sample"] else None
    if "timestep_spacing" in sc:
        if sc["timestep_spacing"] not in SPACINGS:
            raise ConfigError(f"{where}: timestep_spacing={sc['timestep_spacing']!r} is not supported ({', '.join(SPACINGS)})")
        out["sampling.spacing"] = sc["timestep_spacing"]
    return out


def unet_values(uc: dict, path: str | Path) -> dict[str, object]:
    """Our dotted config keys -> values, from a UNet2DModel config.json dict (only the keys it holds)."""
    out: dict[str, object] = {}
    if "sample_size" in uc:
        size = uc["sample_size"]
        sizes = size if isinstance(size, (list, tuple)) else [size]
        if len(set(sizes)) != 1 or not all(isinstance(v, int) for v in sizes):
            raise ConfigError(f"{path}: sample_size={size!r}: ppo_ddpm samples square images (one int, or [n, n])")
        out["model.sample_size"] = sizes[0]
    if "in_channels" in uc:
        out["model.in_channels"] = int(uc["in_channels"])
    if "num_class_embeds" in uc:
        out["model.num_classes"] = int(uc["num_class_embeds"] or 0)
    return out


def _read_json(path: Path, what: str) -> dict:
    """``utils.checkpoint.read_json``, its errors (and any OSError) as a ConfigError naming ``what``."""
    try:
        return read_json(path)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"cannot read the {what}: {e}") from None


def ddim_scheduler_config(cfg: Config) -> dict:
    """The DDIMScheduler config (``DDIMScheduler.from_config``) that samples as ``cfg`` does."""
    kinds = {v: k for k, v in SCHEDULE_KINDS.items()}
    s, c = cfg.schedule, cfg.sampling
    return {
        "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start, "beta_end": s.beta_end,
        "beta_schedule": kinds[s.kind], "trained_betas": None, "prediction_type": cfg.model.prediction_type,
        "clip_sample": c.clip_x0 is not None, "clip_sample_range": 1.0 if c.clip_x0 is None else c.clip_x0,
        "set_alpha_to_one": c.set_alpha_to_one, "steps_offset": c.steps_offset, "timestep_spacing": c.spacing,
        "thresholding": False, "rescale_betas_zero_snr": False,
    }


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def apply_pretrained_folder(cfg: Config, data: dict | None = None, source: str = "<config>") -> tuple[Config, set[str]]:
    """``cfg`` with the configs of the diffusers folder ``model.pretrained`` applied (module docstring):
    its scheduler config and its UNet's config.json; ``data``: the mapping the config was built from (its
    keys are the explicit ones). -> (``cfg`` itself when ``model.pretrained`` is not a folder, else a
    changed copy; the keys whose value the folder changed)."""
    from .diffusers_unet import unet_folder

    folder = Path(cfg.model.pretrained) if cfg.model.pretrained else None
    if folder is None or not folder.is_dir():
        return cfg, set()
    values: list[tuple[dict, Path]] = []
    path = find_scheduler_config(folder)
    if path is None:
        log.warning("model.pretrained=%s has no scheduler_config.json (beside config.json or in scheduler/): "
                    "the schedule, sampling and model.prediction_type keys of %s are used as given", folder, source)
    else:
        values.append((scheduler_values(_read_json(path, "scheduler config"), path), path))
    try:
        unet_json = unet_folder(folder) / "config.json"
    except FileNotFoundError:
        unet_json = None  # not a diffusers folder: loading the model names the problem
    if unet_json is not None:
        values.append((unet_values(_read_json(unet_json, "UNet config"), unet_json), unet_json))
    explicit = set(flatten(data or {}))
    changed: set[str] = set()
    cfg = copy.deepcopy(cfg)
    for found, path in values:
        if "model.sample_size" in found and "data.image_size" not in explicit:
            found = {**found, "data.image_size": found["model.sample_size"]}  # images load at the model's size
        for key, value in found.items():
            ours = get_dotted(cfg, key)
            if key not in explicit:
                if not _same(ours, value):
                    log.info("%s = %r from %s", key, value, path)
                    changed.add(key)
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, value)
            elif _same(ours, value):
                continue
            elif key in MODEL_KEYS:
                raise ConfigError(
                    f"{source}: key '{key}' is {ours!r} but the pretrained model's {path} gives {value!r}; the network "
                    f"was trained with that value: remove '{key}' from the config (it then follows the folder) or set it to {value!r}"
                )
            else:
                log.warning("%s: key '%s' = %r overrides %r from %s", source, key, ours, value, path)
    return cfg, changed
