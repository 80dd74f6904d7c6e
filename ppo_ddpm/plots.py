"""Figures of a run, drawn with matplotlib (Agg backend: files and arrays, never a display).

- :func:`reward_histogram`: rewards of the base and the fine-tuned model on shared bins;
- :func:`reward_curve`: mean reward (+- std band) per PPO iteration, from ``metrics.jsonl`` rows;
- :func:`per_step_figure`: a per-DDIM-step quantity (eval's KL drift) against the timestep t;
- :func:`figure_array`: a figure as uint8 [H, W, 3] (TensorBoard ``add_image``, no PNG round trip);
- :func:`upscale`: an image array enlarged by an integer factor (nearest) to a minimum width.

Non-finite values (NaN, inf) are left out of every plot and counted in its legend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, same output everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

BASE_COLOUR, FT_COLOUR = "#3c6ec8", "#e67828"


def _finite(values) -> tuple[np.ndarray, int]:
    """(finite float64 values, how many were dropped)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(v)
    return v[keep], int((~keep).sum())


def _label(name: str, v: np.ndarray, dropped: int) -> str:
    mean = f"mean {v.mean():.4g}" if v.size else "no finite values"
    return f"{name} ({mean}" + (f", {dropped} non-finite left out)" if dropped else ")")


def reward_histogram(r_base, r_ft, bins: int = 20) -> Figure:
    """Histograms of both models' rewards on shared bins (finite values only)."""
    (b, nb), (f, nf) = _finite(r_base), _finite(r_ft)
    both = np.concatenate([b, f])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.hist(b, edges, alpha=0.6, color=BASE_COLOUR, label=_label("base", b, nb))
    ax.hist(f, edges, alpha=0.6, color=FT_COLOUR, label=_label("fine-tuned", f, nf))
    ax.set(xlabel="reward", ylabel="count", title="reward of the same noise, base vs fine-tuned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def reward_curve(rows: Iterable[dict]) -> Figure:
    """Mean reward per PPO iteration with a +-1 std band (``reward_mean``/``reward_std`` of metrics rows;
    skipped iterations, which have no reward_mean, leave gaps)."""
    rows = [r for r in rows if "reward_mean" in r]
    it = np.array([r["iteration"] + 1 for r in rows], dtype=np.float64)
    mean = np.array([r["reward_mean"] for r in rows], dtype=np.float64)
    std = np.array([r.get("reward_std", np.nan) for r in rows], dtype=np.float64)
    ok = np.isfinite(mean)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(it[ok], mean[ok], color=FT_COLOUR, marker="." if ok.sum() < 50 else None, label="batch mean reward")
    band = ok & np.isfinite(std)
    ax.fill_between(it[band], (mean - std)[band], (mean + std)[band], color=FT_COLOUR, alpha=0.2, label="+-1 std")
    ax.set(xlabel="PPO iteration", ylabel="reward", title="reward over iterations")
    if (~ok).any():
        ax.set_title(f"reward over iterations ({int((~ok).sum())} non-finite left out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_step_figure(timesteps, values, ylabel: str, title: str) -> Figure:
    """``values`` [n] of each DDIM step against its timestep t (x axis runs from T down to 0, as sampling does)."""
    t = np.asarray(timesteps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ok = np.isfinite(v)
    ax.plot(t[ok], v[ok], marker="o", color=FT_COLOUR)
    ax.set(xlabel="timestep t (sampling runs right to left)", ylabel=ylabel, title=title)
    ax.invert_xaxis()
    fig.tight_layout()
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as uint8 [H, W, 3]; the figure is closed."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def save_figure(fig: Figure, path: str | Path) -> tuple[Path, np.ndarray]:
    """Write ``fig`` as a PNG and return (path, its uint8 [H, W, 3] array); the figure is closed."""
    from .data import save_png

    array = figure_array(fig)
    return save_png(array, path), array


def upscale(image: np.ndarray, min_width: int = 256) -> np.ndarray:
    """[H, W, C] enlarged by the smallest integer factor k with k W >= min_width (nearest neighbour)."""
    k = max(1, -(-min_width // image.shape[1]))
    return image.repeat(k, axis=0).repeat(k, axis=1)
