"""A procedural "real" dataset: one anti-aliased saturated disc or square on a plain background.

Small enough that a tiny DDPM learns it roughly in a minute on CPU at 16 x 16, and structured
enough (flat background, sharp edge, one saturated hue) that a small CNN tells real images
from imperfect DDPM samples. Image i of seed s, size S (all draws from ``numpy`` PCG64):

- background: grey level g ~ U[0.1, 0.9] plus a per-channel tint ~ U[-0.05, 0.05];
- shape: disc or square (p = 1/2), radius r ~ U[0.18, 0.32] S, centre ~ U[r + 1, S - r - 1]^2;
  a square has half side 0.85 r (about the disc's area);
- colour: HSV(h, 1, 1), h one of the 6 primary/secondary hues jittered by U[-1/36, 1/36];
- coverage at pixel centre p: disc clip(r - |p - c| + 1/2, 0, 1), square
  clip(0.85 r - |p - c|_inf + 1/2, 0, 1); pixel = coverage * colour + (1 - coverage) * background.
"""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import torch

from .images import IMAGE_EXTENSIONS, save_images

_PREFIX = "real"
_MANIFEST = "procedural.json"
_VERSION = 1


def procedural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """One image, float64 [3, S, S] in [0, 1], drawn from ``rng`` (see module docstring)."""
    background = np.clip(rng.uniform(0.1, 0.9) + rng.uniform(-0.05, 0.05, size=3), 0.0, 1.0)
    is_disc = rng.random() < 0.5
    r = rng.uniform(0.18, 0.32) * size
    cy, cx = rng.uniform(r + 1.0, size - r - 1.0, size=2)
    hue = (rng.integers(6) / 6.0 + rng.uniform(-1 / 36, 1 / 36)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 1.0, 1.0))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - cy, xx - cx
    if is_disc:
        coverage = np.clip(r - np.hypot(dy, dx) + 0.5, 0.0, 1.0)
    else:
        coverage = np.clip(0.85 * r - np.maximum(np.abs(dy), np.abs(dx)) + 0.5, 0.0, 1.0)
    cov = coverage[None]
    return cov * colour[:, None, None] + (1.0 - cov) * background[:, None, None]


def procedural_images(count: int, image_size: int, seed: int) -> torch.Tensor:
    """``count`` images, float32 [N, 3, S, S] in [-1, 1], deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    x = np.stack([procedural_image(rng, image_size) for _ in range(count)])
    return torch.from_numpy(2.0 * x - 1.0).to(torch.float32)


def make_procedural_dataset(out_dir: str | Path, count: int, image_size: int, seed: int) -> Path:
    """Write ``count`` PNGs to ``out_dir/real/real_{i:05d}.png``; return ``out_dir``.

    Idempotent: ``out_dir/procedural.json`` records (seed, count, image_size); when it matches
    and all the files are there nothing is written. Otherwise this function's own earlier
    files (``real_*.png``) are removed and the set is rewritten; other files are left alone.
    """
    if count < 1 or image_size < 4:
        raise ValueError(f"procedural dataset needs count >= 1 and image_size >= 4, got {count}, {image_size}")
    out_dir = Path(out_dir)
    real = out_dir / "real"
    manifest = out_dir / _MANIFEST
    want = {"version": _VERSION, "seed": seed, "count": count, "image_size": image_size}
    names = [real / f"{_PREFIX}_{i:05d}.png" for i in range(count)]
    if manifest.is_file() and all(p.is_file() for p in names):
        try:
            if json.loads(manifest.read_text()) == want:
                return out_dir
        except json.JSONDecodeError:
            pass
    manifest.unlink(missing_ok=True)
    if real.is_dir():
        for p in real.glob(f"{_PREFIX}_*"):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                p.unlink()
    save_images(procedural_images(count, image_size, seed), real, _PREFIX)
    manifest.write_text(json.dumps(want))
    return out_dir


def resolve_data_root(cfg) -> Path:
    """The image folder of a run: ``cfg.data.root``, or (root empty) the procedural dataset made once
    under ``{output_dir}/data`` (``data.procedural_count`` images of ``data.image_size``, seed ``seed``)."""
    if cfg.data.root:
        return Path(cfg.data.root)
    return make_procedural_dataset(Path(cfg.output_dir) / "data", cfg.data.procedural_count, cfg.data.image_size, cfg.seed)
