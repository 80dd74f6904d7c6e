"""Build, save and load the eps-model.

Files written by :func:`save_model`:

- ``*.pth``: ``torch.save({"format": "ppo_ddpm", "arch": "unet" | "diffusers", "config": ModelConfig dict,
  ["diffusers_config": dict,] "state_dict": ...})``, written atomically, read with weights_only=True.
- ``*.safetensors``: the state dict, plus the same metadata (without ``state_dict``) in a sibling ``*.json``.

A diffusers ``UNet2DModel`` folder (config.json + weights) loads through :class:`DiffusersUNet`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..config import ConfigError, ModelConfig, config_from_dict
from ..utils.checkpoint import (
    CheckpointError, atomic_save, atomic_write_text, load_safetensors, read_json, safe_load, save_safetensors,
)
from .diffusers_unet import DiffusersUNet, unet_folder
from .unet import UNet

ARCH_FIELDS = ("sample_size", "in_channels", "base_channels", "channel_mults", "num_res_blocks", "attention_resolutions", "num_classes",
               "prediction_type")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def build_model(cfg: ModelConfig) -> nn.Module:
    """A fresh :class:`UNet` sized by ``cfg``, or the model at ``cfg.pretrained`` (checked against ``cfg``)."""
    if not cfg.pretrained:
        return UNet.from_config(cfg)
    if not Path(cfg.pretrained).exists():
        raise CheckpointError(f"model.pretrained: {cfg.pretrained} does not exist")
    return load_model(cfg.pretrained, cfg)


def _metadata(model: nn.Module, cfg: ModelConfig) -> dict:
    meta = {"format": "ppo_ddpm", "arch": "unet", "config": {**dataclasses.asdict(cfg), "pretrained": ""}}
    if isinstance(model, DiffusersUNet):
        meta.update(arch="diffusers", diffusers_config=model.diffusers_config())
    elif not isinstance(model, UNet):
        raise TypeError(f"save_model expects a UNet or DiffusersUNet, got {type(model).__name__}")
    return meta


def save_model(model: nn.Module, path: str | Path, cfg: ModelConfig) -> Path:
    """Write ``model`` (weights on CPU) to ``path`` (.pth or .safetensors); returns ``path``."""
    path = Path(path)
    model = unwrap(model)
    meta = _metadata(model, cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".pth":
        return atomic_save({**meta, "state_dict": state}, path)
    if path.suffix == ".safetensors":
        save_safetensors(state, path)
        atomic_write_text(json.dumps(meta, indent=2), path.with_suffix(".json"))
        return path
    raise ValueError(f"{path}: model files must end in .pth or .safetensors")


def _arch_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: file {a.get(k)!r} vs config {b.get(k)!r}" for k in ARCH_FIELDS if k in a and a.get(k) != b.get(k)]


def _load_state(model: nn.Module, state: dict, path: Path, file_cfg: dict | None, cfg: ModelConfig | None) -> nn.Module:
    """load_state_dict, or a CheckpointError listing the differing config fields, keys and shapes."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    fields = _arch_diff(file_cfg, dataclasses.asdict(cfg)) if file_cfg and cfg is not None else []
    if fields or missing or unexpected or shapes:
        lines = [f"{path}: checkpoint does not match the model architecture"] + [f"  model.{d}" for d in fields]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" ... (+{len(items) - 10})" if len(items) > 10 else ""
                lines.append(f"  {title}: {', '.join(items[:10])}{more}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)
    return model


def _check_diffusers(model: DiffusersUNet, cfg: ModelConfig | None, path: Path) -> DiffusersUNet:
    out_ch = model.unet.config.out_channels
    if out_ch != model.in_channels:
        raise CheckpointError(f"{path}: UNet2DModel has in_channels={model.in_channels} but out_channels={out_ch}; eps needs them equal")
    if cfg is not None:
        diff = [f"model.{k}: file {getattr(model, k)!r} vs config {getattr(cfg, k)!r}"
                for k in ("sample_size", "in_channels", "num_classes") if getattr(model, k) != getattr(cfg, k)]
        if diff:
            raise CheckpointError(f"{path}: diffusers UNet2DModel does not match the config:\n  " + "\n  ".join(diff))
    return model


def _model_from_meta(meta: dict, cfg: ModelConfig | None, path: Path) -> tuple[nn.Module, dict | None]:
    """The architecture named by a file's metadata (or by ``cfg``), freshly initialised."""
    file_cfg = meta.get("config")
    if meta.get("arch") == "diffusers":
        pred = (file_cfg or {}).get("prediction_type")
        if cfg is not None and pred is not None and pred != cfg.prediction_type:
            raise CheckpointError(f"{path}: model.prediction_type: file {pred!r} vs config {cfg.prediction_type!r}")
        return _check_diffusers(DiffusersUNet.from_config(meta["diffusers_config"]), cfg, path), None
    if cfg is None:
        if file_cfg is None:
            raise CheckpointError(f"{path}: no model config stored with the weights; pass model_cfg")
        try:
            cfg = config_from_dict({"model": file_cfg}, source=str(path)).model
        except ConfigError as e:
            raise CheckpointError(f"{path}: stored model config is invalid: {e}") from None
    return UNet.from_config(cfg), file_cfg


def load_model(path: str | Path, model_cfg: ModelConfig | None = None) -> nn.Module:
    """Load a .pth / .safetensors file from :func:`save_model` or a diffusers UNet2DModel folder.

    With ``model_cfg`` the model is built from it and the file must match it (else CheckpointError naming
    the file, the differing config fields and the mismatching keys/shapes); without it, from the stored config.
    """
    path = Path(path)
    if path.is_dir():
        try:
            folder = unet_folder(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: a folder must be a diffusers UNet2DModel (config.json + weights) "
                                  "or a pipeline folder (model_index.json, unet/, scheduler/)") from None
        return _check_diffusers(DiffusersUNet.from_pretrained(folder), model_cfg, path)
    if path.suffix == ".safetensors":
        state, _ = load_safetensors(path)
        sidecar = path.with_suffix(".json")
        meta = read_json(sidecar) if sidecar.is_file() or model_cfg is None else {}
    elif path.suffix in (".pth", ".pt"):
        meta = safe_load(path)
        if not isinstance(meta, dict) or not isinstance(meta.get("state_dict"), dict):
            raise CheckpointError(f"{path}: not a model file written by save_model (no 'state_dict' entry)")
        state = meta["state_dict"]
    else:
        raise CheckpointError(f"{path}: expected a .pth / .safetensors file or a diffusers folder")
    model, file_cfg = _model_from_meta(meta, model_cfg, path)
    return _load_state(model, state, path, file_cfg, model_cfg)
