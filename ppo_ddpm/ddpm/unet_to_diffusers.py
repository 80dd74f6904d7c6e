"""Our :class:`~ppo_ddpm.ddpm.unet.UNet` as a diffusers ``UNet2DModel`` computing the same function.

The two architectures are the same DDPM UNet (Ho et al. 2020): sinusoidal embedding [cos, sin]
(``flip_sin_to_cos=True, freq_shift=0``), Linear-SiLU-Linear time MLP, ResBlocks with the embedding
added after conv1, single-head attention (``attention_head_dim=None``: one head of all channels),
stride-2 conv down, nearest x2 + conv up, skips taken after every block and downsampler. The one
difference: our GroupNorms use gcd(32, channels) groups per layer and UNet2DModel one
``norm_num_groups`` for all, so a model converts exactly only when every norm has the same group
count (every channel count a multiple of 32, e.g. ``base_channels: 32`` or more); otherwise
:class:`ExportError` says so. Weights map one to one; the qkv 1x1 conv splits into to_q, to_k, to_v.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ModelConfig
from .diffusers_unet import import_unet2d
from .unet import UNet


class ExportError(ValueError):
    """A model cannot be written as a diffusers folder exactly; the message says why."""


def unet2d_config(model: UNet, cfg: ModelConfig) -> dict:
    """The UNet2DModel config of ``model``, built from ``cfg``."""
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) != 1:
        raise ExportError(
            f"this UNet's GroupNorms use {sorted(groups)} groups (gcd(32, channels) per layer), but diffusers' "
            "UNet2DModel has one norm_num_groups for every layer, so it cannot be exported exactly; "
            "train with channel counts that are multiples of 32 (model.base_channels >= 32, a multiple of 32)"
        )
    res = [cfg.sample_size // 2**i for i in range(len(cfg.channel_mults))]
    attn = [r in cfg.attention_resolutions for r in res]
    return dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        center_input_sample=False, time_embedding_type="positional", freq_shift=0, flip_sin_to_cos=True,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults), layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=cfg.dropout,
        act_fn="silu", attention_head_dim=None, norm_num_groups=groups.pop(), norm_eps=1e-6,
        resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
        num_class_embeds=cfg.num_classes or None,
    )


# our state-dict key (regex) -> diffusers key (template)
_RENAMES = [
    (r"time_mlp\.0\.", "time_embedding.linear_1."), (r"time_mlp\.2\.", "time_embedding.linear_2."),
    (r"class_emb\.", "class_embedding."), (r"norm_out\.", "conv_norm_out."),
    (r"(down|up)\.(\d+)\.blocks\.(\d+)\.", r"\1_blocks.\2.resnets.\3."),
    (r"(down|up)\.(\d+)\.attns\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
    (r"down\.(\d+)\.resample\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"up\.(\d+)\.resample\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"mid_block1\.", "mid_block.resnets.0."), (r"mid_block2\.", "mid_block.resnets.1."),
    (r"mid_attn\.", "mid_block.attentions.0."),
    (r"\.emb_proj\.", ".time_emb_proj."), (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d+)\.proj\.", r"\1.to_out.0."),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> UNet2DModel's (1x1 attention convs become Linear weights)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        qkv = re.match(r"(.*attentions\.\d+)\.qkv\.(weight|bias)$", key)
        if qkv:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{qkv.group(1)}.{name}.{qkv.group(2)}"] = part.reshape(part.shape[0], -1) if part.dim() > 1 else part
        elif re.search(r"attentions\.\d+\.to_out\.0\.weight$", key):
            out[key] = value.reshape(value.shape[0], -1)
        else:
            out[key] = value
    return out


def unet_to_diffusers(model: UNet, cfg: ModelConfig) -> nn.Module:
    """A UNet2DModel with the weights of ``model`` (sized by ``cfg``): the same outputs up to float rounding;
    ExportError when no UNet2DModel computes the same function."""
    unet2d = import_unet2d()(**unet2d_config(model, cfg))
    state = convert_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    own = unet2d.state_dict()
    if own.keys() != state.keys() or any(own[k].shape != v.shape for k, v in state.items()):
        diff = sorted(own.keys() ^ state.keys())[:6] or [k for k, v in state.items() if own[k].shape != v.shape][:6]
        raise ExportError(f"UNet -> UNet2DModel: parameters do not correspond ({', '.join(diff)})")
    unet2d.load_state_dict(state)
    return unet2d.eval()
