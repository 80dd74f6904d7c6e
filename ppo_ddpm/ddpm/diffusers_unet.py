"""A diffusers ``UNet2DModel`` behind the UNet interface: forward(x, t, class_labels=None) -> eps.

diffusers is an optional extra (``pip install -e ".[diffusers]"``); it is imported only here, lazily.
Folders are read from disk only (``local_files_only``), never from a hub.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def import_unet2d():
    """diffusers.UNet2DModel, or an ImportError saying how to install the extra."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ImportError(
            "loading a diffusers UNet2DModel needs the optional dependency 'diffusers': "
            'pip install --no-build-isolation -e ".[diffusers]"'
        ) from e
    return UNet2DModel


def plain_config(config) -> dict:
    """A diffusers FrozenDict config as a JSON/weights_only-safe dict (tuples -> lists, no private keys)."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in dict(config).items() if not k.startswith("_")}


def unet_folder(folder: str | Path) -> Path:
    """The UNet2DModel folder of ``folder``: itself (config.json) or, for a pipeline folder, its ``unet/``."""
    folder = Path(folder)
    for candidate in (folder, folder / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: not a diffusers UNet2DModel folder (config.json) nor a pipeline folder (unet/config.json)")


class DiffusersUNet(nn.Module):
    """Wraps ``unet: UNet2DModel``; exposes sample_size, in_channels, num_classes like :class:`UNet`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        size = cfg.sample_size
        self.sample_size = int(size if isinstance(size, int) else size[0])
        self.in_channels = int(cfg.in_channels)
        self.num_classes = int(cfg.num_class_embeds or 0)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DiffusersUNet":
        """Load a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin) or a pipeline
        folder (model_index.json + unet/) from disk."""
        UNet2DModel = import_unet2d()
        return cls(UNet2DModel.from_pretrained(str(unet_folder(folder)), local_files_only=True))

    @classmethod
    def from_config(cls, config: dict) -> "DiffusersUNet":
        """A freshly initialised UNet2DModel from its config dict (weights are loaded by the caller)."""
        return cls(import_unet2d().from_config(config))

    def diffusers_config(self) -> dict:
        return plain_config(self.unet.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, y): x [B, C, H, W], t [B] (or scalar), y [B] long or None -> [B, C, H, W]."""
        return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]
