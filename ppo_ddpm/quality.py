"""How far samples are from the real data: the checks that tell a reward gain from reward hacking.

All on images x [N, 3, S, S] in [-1, 1], offline, deterministic:

- ``kid(a, b)``: kernel inception distance (Binkowski et al. 2018), the unbiased MMD^2 with the cubic
  kernel k(u, v) = (u.v / d + 1)^3, on the features of ``RandomFeatures``: a fixed, untrained CNN
  (weights drawn from a seeded generator, no download) whose per-layer channel means and standard
  deviations (d = 448 values) summarise colour, edges and texture at three scales. Random
  convolutional features are not Inception's, so KID values are comparable only with each other
  (same sizes, same seed), e.g. fine-tuned vs base, both against the real images.
- ``image_stats(x)``: per-image statistics, averaged: mean colour (R, G, B in [-1, 1]), saturation
  (max - min over RGB, in [0, 2]), grain = median over pixels of |3x3 Laplacian response| (the median
  ignores the few edge pixels of flat shapes and sees noise textures, which cover every pixel), and
  mean pairwise L2 distance (``diversity``).
"""
from __future__ import annotations

import torch
from torch import nn

FEATURE_SEED = 20261130
IMAGE_STATS = ("mean_r", "mean_g", "mean_b", "saturation", "grain", "diversity")  # the keys of image_stats
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


class RandomFeatures(nn.Module):
    """conv3x3(3, 32) -> ReLU -> conv3x3/2(32, 64) -> ReLU -> conv3x3/2(64, 128) -> ReLU, He-normal weights
    from ``torch.Generator().manual_seed(seed)``, zero biases; output [N, 448]: each layer's channel
    means and standard deviations over space."""

    def __init__(self, seed: int = FEATURE_SEED):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2)):
            conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * c_in)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x.float()
        for conv in self.convs:
            h = torch.relu(conv(h))
            feats += [h.mean(dim=(2, 3)), h.std(dim=(2, 3))]
        return torch.cat(feats, dim=1)


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected images [N, 3, S, S], got {tuple(x.shape)}")


def kid_from_features(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """Unbiased MMD^2 of the cubic polynomial kernel between feature sets [m, d] and [n, d] (m, n >= 2), float64."""
    if fa.shape[0] < 2 or fb.shape[0] < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {fa.shape[0]} and {fb.shape[0]}")
    fa, fb = fa.double(), fb.double()
    d = fa.shape[1]
    k = lambda u, v: (u @ v.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = k(fa, fa), k(fb, fb), k(fa, fb)
    m, n = fa.shape[0], fb.shape[0]
    return float((kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
                 - 2 * kab.mean())


def kid(a: torch.Tensor, b: torch.Tensor, features: nn.Module | None = None) -> float:
    """KID between image sets a and b (module docstring), computed on the CPU."""
    _check(a, "kid(a)")
    _check(b, "kid(b)")
    features = features or RandomFeatures()
    return kid_from_features(features(a.cpu()), features(b.cpu()))


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """mean_{i<j} ||x_i - x_j||_2 over the flattened samples (float64); 0 for one sample."""
    if x.shape[0] < 2:
        return 0.0
    return torch.pdist(x.flatten(1).double()).mean().item()


def image_stats(x: torch.Tensor) -> dict[str, float]:
    """Mean colour, saturation, grain and diversity of images [N, 3, S, S] (module docstring)."""
    _check(x, "image_stats")
    x = x.detach().double().cpu()
    lap = torch.nn.functional.conv2d(x.reshape(-1, 1, *x.shape[2:]), LAPLACIAN.double()[None, None], padding=0)
    rgb = x.mean(dim=(0, 2, 3)).tolist()
    return dict(zip(IMAGE_STATS, (rgb[0], rgb[1], rgb[2], float((x.amax(dim=1) - x.amin(dim=1)).mean()),
                                  float(lap.abs().flatten(1).median(dim=1).values.mean()), mean_pairwise_distance(x))))
