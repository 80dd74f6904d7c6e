"""A small CNN scoring images (real vs fake, or any classes), and its safetensors file.

RewardCNN: x [B, C, S, S] in [-1, 1] -> logits [B, num_classes]

    conv3x3(C, h) -> GN -> SiLU -> conv3x3/2(h, 2h) -> GN -> SiLU -> conv3x3/2(2h, 4h) -> GN -> SiLU
    -> [mean over space, max over space] (8h) -> linear(8h, num_classes)

Class order of the real-vs-fake model follows sorted folder names: 0 = fake, 1 = real.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..utils.checkpoint import CheckpointError, load_safetensors, save_safetensors
from .base import RewardError

FORMAT = "ppo_ddpm.reward_cnn"
CLASS_NAMES = ("fake", "real")


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(4, c_out), c_out), nn.SiLU())


class RewardCNN(nn.Module):
    """Logits of ``num_classes`` classes for images of size ``image_size`` (see module docstring)."""

    def __init__(self, in_channels: int = 3, hidden_channels: int = 16, num_classes: int = 2, image_size: int = 16):
        super().__init__()
        if min(in_channels, hidden_channels, image_size) < 1 or num_classes < 2:
            raise ValueError(
                f"RewardCNN needs positive sizes and num_classes >= 2, got in_channels={in_channels}, "
                f"hidden_channels={hidden_channels}, num_classes={num_classes}, image_size={image_size}"
            )
        self.config = dict(in_channels=in_channels, hidden_channels=hidden_channels,
                           num_classes=num_classes, image_size=image_size)
        h = hidden_channels
        self.features = nn.Sequential(_block(in_channels, h, 1), _block(h, 2 * h, 2), _block(2 * h, 4 * h, 2))
        self.head = nn.Linear(8 * h, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"RewardCNN expects images [B, {c}, {s}, {s}], got {tuple(x.shape)}")
        f = self.features(x)
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))


def save_reward_model(model: RewardCNN, path: str | Path, class_names=CLASS_NAMES, **info) -> Path:
    """Write weights + config (+ class names and any JSON-able ``info``) to a safetensors file, atomically."""
    metadata = {"format": FORMAT, "config": json.dumps(model.config), "class_names": json.dumps(list(class_names)),
                "info": json.dumps(info)}
    return save_safetensors(model.state_dict(), path, metadata)


def read_reward_model_config(path: str | Path) -> dict | None:
    """The stored RewardCNN config (in_channels, hidden_channels, num_classes, image_size) of a
    reward model file, read from its metadata only; None when the file is not a readable reward model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"]) if meta.get("format") == FORMAT else None
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardCNN, dict]:
    """Read a file of :func:`save_reward_model` -> (model on ``device``, metadata with parsed JSON values).

    A missing / corrupt file, a file of another kind or mismatching weights raise
    :class:`RewardError` naming the file.
    """
    try:
        tensors, raw = load_safetensors(path)
    except CheckpointError as e:
        raise RewardError(f"reward model: {e}") from None
    if raw.get("format") != FORMAT:
        raise RewardError(f"{path} is not a reward model file (metadata format={raw.get('format')!r}, expected {FORMAT!r})")
    try:
        meta = {k: json.loads(raw[k]) for k in ("config", "class_names", "info")}
        model = RewardCNN(**meta["config"])
        model.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise RewardError(f"cannot load reward model {path}: {type(e).__name__}: {e}") from None
    return model.to(device), meta
