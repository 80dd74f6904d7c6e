"""A small real image set that an installed package ships: scikit-learn's 8x8 handwritten digits
(UCI optical digits, 1797 images, 10 classes), written as labelled class folders.

    python -m ppo_ddpm.data.digits runs/digits/data [--per-class N]      # pip install -e ".[digits]"

writes ``root/<d>/digit_{i:05d}.png`` for d = 0..9: grey level v in 0..16 -> round(255 v / 16), saved as
RGB 8 x 8 PNG (exact: ``load_images`` reads back (2 v / 16 - 1) up to the uint8 rounding). The loader
upscales them to ``data.image_size`` (antialiased bicubic). The layout serves a class-conditional DDPM
(``model.num_classes: 10`` reads ``data.root/<c>/``) and the ``classifier`` reward, which trains on
``data.root/<class>/`` (configs/digits.yaml). Nothing is downloaded: the images ship inside scikit-learn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .images import save_images

NUM_CLASSES = 10


def digits_images(per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 3, 8, 8] in [-1, 1], labels int64 [N]); ``per_class``: the first N of each digit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError('the digits data set ships with scikit-learn: pip install --no-build-isolation -e ".[digits]"') from e
    data = load_digits()
    images, labels = data.images, data.target.astype(np.int64)
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        keep = np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in range(NUM_CLASSES)])
        images, labels = images[keep], labels[keep]
    grey = torch.from_numpy(np.round(images * 255.0 / 16.0) / 127.5 - 1.0).float()
    return grey[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels)


def write_digits_dataset(root: str | Path, per_class: int | None = None) -> Path:
    """Write the digits as ``root/<d>/digit_*.png`` (module docstring); returns ``root``."""
    root = Path(root)
    x, y = digits_images(per_class)
    for d in range(NUM_CLASSES):
        save_images(x[y == d], root / str(d), "digit")
    return root


def main(argv: list[str] | None = None) -> int:
    from ..utils.cli import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ppo_ddpm.data.digits", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output folder (use it as data.root)")
    parser.add_argument("--per-class", type=int, default=None, help="only the first N images of each digit")
    args = parser.parse_args(argv)

    def body() -> None:
        root = write_digits_dataset(args.root, args.per_class)
        print(f"[digits] wrote {sum(1 for _ in root.glob('*/digit_*.png'))} images to {root}/<0..9>/")

    return run_cli("ppo_ddpm.data.digits", argv, body, errors=(ImportError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
