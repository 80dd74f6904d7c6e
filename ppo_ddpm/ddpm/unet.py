"""The DDPM noise predictor eps_theta(x_t, t[, y]) (Ho et al. 2020, Appendix B).

conv_in -> down levels (ResBlocks [+ self-attention], stride-2 conv) -> middle (Res, Attn, Res)
-> up levels (ResBlocks on [h, skip] [+ attention], nearest x2 + conv) -> GroupNorm, SiLU, conv_out.

Every ResBlock adds the embedding e = MLP(sinusoid(t)) (+ Embedding(y) when ``num_classes > 0``).
Shapes: x [B, C, H, W], t [B] (int or float), y [B] long -> eps [B, C, H, W].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding [B, dim]: [cos(t w_k), sin(t w_k)], w_k = 10000^(-k / (dim/2)), k < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + W_e e;  out = skip(x) + conv(dropout(SiLU(GN(h))))."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2, self.dropout = _norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: x + proj(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # [B, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResBlocks (each optionally followed by attention) of one resolution, plus its resampler."""

    def __init__(self, blocks: list[ResBlock], attn: bool, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList([AttnBlock(b.conv2.out_channels) if attn else nn.Identity() for b in blocks])
        self.resample = resample if resample is not None else nn.Identity()


class UNet(nn.Module):
    """eps_theta(x_t, t, y) sized by :class:`ModelConfig` (see the module docstring)."""

    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 3,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] | list[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] | list[int] = (8,),
        dropout: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        resolutions = [sample_size // 2**i for i in range(len(channel_mults))]
        if not channel_mults or num_res_blocks < 1 or base_channels < 1:
            raise ValueError("model.channel_mults must be non-empty, model.num_res_blocks and model.base_channels >= 1")
        if sample_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"model.sample_size={sample_size} is not divisible by 2^(len(model.channel_mults)-1)")
        unused = sorted(set(attention_resolutions) - set(resolutions))
        if unused:
            raise ValueError(f"model.attention_resolutions {unused} match no UNet resolution (resolutions: {resolutions})")
        self.sample_size, self.in_channels, self.num_classes = sample_size, in_channels, num_classes
        self.base_channels, self.downscale = base_channels, 2 ** (len(channel_mults) - 1)
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        skips, ch = [base_channels], base_channels
        self.down = nn.ModuleList()
        for i, (mult, res) in enumerate(zip(channel_mults, resolutions)):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                skips.append(ch)
            last = i == len(channel_mults) - 1
            self.down.append(Level(blocks, res in attention_resolutions, None if last else Downsample(ch)))
            if not last:
                skips.append(ch)
        self.mid_block1, self.mid_attn = ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch)
        self.mid_block2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(len(channel_mults))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), base_channels * channel_mults[i], emb_dim, dropout))
                ch = base_channels * channel_mults[i]
            self.up.append(Level(blocks, resolutions[i] in attention_resolutions, Upsample(ch) if i > 0 else None))
        self.norm_out, self.conv_out = _norm(ch), nn.Conv2d(ch, in_channels, 3, padding=1)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "UNet":
        return cls(
            cfg.sample_size, cfg.in_channels, cfg.base_channels, list(cfg.channel_mults), cfg.num_res_blocks,
            list(cfg.attention_resolutions), cfg.dropout, cfg.num_classes,
        )

    def embed(self, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """e = MLP(sinusoid(t)) (+ Embedding(y)) [B, 4 * base_channels]; t may be a scalar."""
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must have shape [B]=[{batch}], got {tuple(t.shape)}")
        emb_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        emb = self.time_mlp(timestep_embedding(t, self.base_channels, emb_dtype).to(self.time_mlp[0].weight.dtype))
        if self.class_emb is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional UNet (model.num_classes=0)")
            return emb
        if class_labels is None:
            raise ValueError(f"this UNet is class-conditional (model.num_classes={self.num_classes}); pass class_labels [B]")
        return emb + self.class_emb(class_labels.long())

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, y): x [B, C, H, W], t [B], y [B] long or None -> [B, C, H, W]."""
        if x.dim() != 4 or x.shape[-1] % self.downscale or x.shape[-2] % self.downscale:
            raise ValueError(f"UNet input must be [B, C, H, W] with H, W divisible by {self.downscale}, got {tuple(x.shape)}")
        emb = self.embed(t, class_labels, x.shape[0], x.dtype)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                hs.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
