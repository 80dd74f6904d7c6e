"""Image folders <-> tensors in [-1, 1].

Loading (``load_images``), per file, sorted by name, non-recursive:

1. decode with PIL (``.png .jpg .jpeg .bmp .webp``, case-insensitive); other files are skipped,
   counted and reported in one logged warning;
2. to RGB in [0, 1] (float64): 16/32-bit integer grey (``I;16*``, ``I``) is divided by 65535;
   modes with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are composited over
   white, rgb * a + (1 - a); every other mode (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``...)
   goes through PIL's ``convert("RGB")``;
3. centre-crop to the largest square, then (only if the side is not S) resize to S x S with
   antialiased bicubic interpolation (``torch.nn.functional.interpolate``), clamped to [0, 1];
4. x = 2 v - 1, float32, [3, S, S].

Saving quantises x to uint8 as round((x + 1) * 127.5) after clamping to [-1, 1], so an 8-bit
image survives load -> save exactly.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_INT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DataError(ValueError):
    """An image folder or file cannot be used; the message names the path."""


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of ``folder`` (by extension); logs how many other files were skipped."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = len(files) - len(images)
    if skipped:
        log.warning("skipped %d non-image files in %s", skipped, folder)
    if not images:
        raise DataError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in folder {folder}")
    return images


def _to_rgb01(im: Image.Image, path: Path) -> np.ndarray:
    """PIL image of any mode -> float64 [H, W, 3] in [0, 1] (see module docstring, step 2)."""
    if im.mode in _INT_GREY_MODES:
        grey = np.asarray(im, dtype=np.float64) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
        a = rgba[..., 3:]
        return rgba[..., :3] * a + (1.0 - a)
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as e:
        raise DataError(f"cannot convert image mode {im.mode!r} to RGB: {path} ({e})") from None
    return np.asarray(rgb, dtype=np.float64) / 255.0


def _center_crop_resize(v: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size]: centre square crop, antialiased bicubic resize, clamp [0, 1]."""
    _, h, w = v.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    v = v[:, top : top + side, left : left + side]
    if side != size:
        v = F.interpolate(v[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return v.clamp(0.0, 1.0)


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """One image file -> float32 [3, S, S] in [-1, 1]; unreadable file -> DataError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb01(im, path)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"corrupt or unreadable image: {path} ({e})") from None
    v = torch.from_numpy(rgb).permute(2, 0, 1)
    v = _center_crop_resize(v, image_size)
    return (2.0 * v - 1.0).to(torch.float32)


def load_images(folder: str | Path, image_size: int) -> torch.Tensor:
    """All images of ``folder`` -> float32 [N, 3, S, S] in [-1, 1] (sorted by file name)."""
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    return torch.stack([load_image(p, image_size) for p in list_images(folder)])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]: round((clamp(x) + 1) * 127.5)."""
    x = x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise DataError(f"{what}: expected images [B, 3, H, W], got shape {tuple(x.shape)}")


def save_images(x: torch.Tensor, folder: str | Path, prefix: str, start: int = 0) -> list[Path]:
    """Write x [B, 3, H, W] in [-1, 1] as ``folder/{prefix}_{start + i:05d}.png``; returns the paths."""
    _check_batch(x, "save_images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(x).numpy()):
        p = folder / f"{prefix}_{start + i:05d}.png"
        Image.fromarray(img, "RGB").save(p)
        paths.append(p)
    return paths


def make_grid(x: torch.Tensor, nrow: int = 8, padding: int = 1, what: str = "make_grid") -> np.ndarray:
    """Tile x [B, 3, H, W] in [-1, 1] -> uint8 [rows (H + p) + p, cols (W + p) + p, 3], ``nrow``
    images per row, black ``padding`` px (``what`` names the caller in errors)."""
    _check_batch(x, what)
    if nrow < 1:
        raise DataError(f"{what}: nrow must be >= 1, got {nrow}")
    b, _, h, w = x.shape
    ncol, nrows = min(nrow, b), math.ceil(b / nrow)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), np.uint8)
    for i, img in enumerate(to_uint8(x).numpy()):
        r, c = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = img
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 [H, W, 3] image as an RGB PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "RGB").save(path)
    return path


def save_grid(x: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 1) -> Path:
    """Write ``make_grid(x, nrow, padding)`` as a PNG (parent folders created); returns the path."""
    return save_png(make_grid(x, nrow, padding, what="save_grid"), path)
