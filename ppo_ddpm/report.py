"""One page per evaluated run: ``{output_dir}/eval/report.html`` and ``report.png``.

Both show the reward over PPO iterations (``reward_curve.png``, when the run has a metrics.jsonl),
the reward histogram of base vs fine-tuned, the side-by-side sample grid, the per-step KL drift and
the summary table of ``eval.json``. The HTML embeds the PNGs (one self-contained file); the PNG lays
the same figures out with matplotlib. ``python -m ppo_ddpm.eval`` writes them; to redraw them from
the files of an earlier evaluation:

    python -m ppo_ddpm.report --cfg FILE [--set output_dir=...]
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import numpy as np

from .config import add_config_args, config_from_args
from .pipeline import PipelineError
from .utils.checkpoint import atomic_write_text
from .utils.cli import run_cli
from .utils.finite import format_number

FIGURES = (("reward_curve", "Reward over PPO iterations"), ("reward_hist", "Reward histogram, same noise"),
           ("side_by_side", "Samples: base | fine-tuned (same noise per cell)"), ("kl_per_step", "KL drift per DDIM step"))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when missing; a torn last line is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def summary_rows(result: dict, rows: list[dict]) -> list[tuple[str, str]]:
    """(quantity, value) lines of the summary table, from eval.json (and the last metrics row)."""
    r, n = result, format_number  # None: a value that was not finite
    table = [
        ("samples (same noise for both)", f"{r['num_samples']}"),
        ("base reward, mean (std)", f"{n(r['base_reward_mean'], '+.4f')} ({n(r['base_reward_std'], '.4f')})"),
        ("fine-tuned reward, mean (std)", f"{n(r['finetuned_reward_mean'], '+.4f')} ({n(r['finetuned_reward_std'], '.4f')})"),
        ("reward gain", n(r["reward_gain"], "+.4f")),
        ("win rate", n(r["win_rate"], ".3f")),
        ("KL drift from base (nats)", n(r["kl_drift_total"], ".4g")),
        ("diversity base / fine-tuned", f"{n(r['base_diversity'], '.3f')} / {n(r['finetuned_diversity'], '.3f')}"),
    ]
    if rows:
        table.append(("PPO iterations logged", f"{len(rows)}"))
    return table


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_html(eval_dir: Path, result: dict, rows: list[dict]) -> Path:
    """report.html: the figures present in ``eval_dir`` (embedded) and the summary table."""
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(result, rows))
    figures = "".join(
        f'<figure><img src="{_data_uri(eval_dir / f"{name}.png")}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for name, title in FIGURES if (eval_dir / f"{name}.png").is_file()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ppo_ddpm evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;margin:1em;vertical-align:top}}
img{{image-rendering:pixelated;max-width:640px}} td{{padding:2px 12px}} table{{border-collapse:collapse}}
tr:nth-child(odd){{background:#f2f2f2}}</style></head>
<body><h1>ppo_ddpm evaluation</h1>
<p>base: <code>{html.escape(str(result.get('base_path', '')))}</code><br>
fine-tuned: <code>{html.escape(str(result.get('finetuned_path', '')))}</code></p>
<table>{cells}</table>
{figures}
</body></html>
"""
    return atomic_write_text(page, eval_dir / "report.html")


def write_png(eval_dir: Path, result: dict, rows: list[dict]) -> Path:
    """report.png: the figures of ``eval_dir`` and the summary table on one matplotlib page."""
    from PIL import Image

    from .plots import plt, save_figure

    present = [(name, title) for name, title in FIGURES if (eval_dir / f"{name}.png").is_file()]
    n = len(present) + 1
    cols = 2
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(12, 4.2 * ((n + cols - 1) // cols)), dpi=100)
    axes = np.atleast_1d(axes).reshape(-1)
    for ax, (name, title) in zip(axes, present):
        ax.imshow(np.asarray(Image.open(eval_dir / f"{name}.png").convert("RGB")), interpolation="nearest")
        if name == "side_by_side":  # the matplotlib figures carry their own titles
            ax.set_title(title)
        ax.axis("off")
    table_ax = axes[len(present)]
    table_ax.axis("off")
    table = table_ax.table(cellText=[list(r) for r in summary_rows(result, rows)], colLabels=["quantity", "value"],
                           loc="center", cellLoc="left")
    table.scale(1, 1.4)
    table_ax.set_title("summary (eval.json)")
    for ax in axes[len(present) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, eval_dir / "report.png")[0]


def write_report(eval_dir: str | Path, result: dict, rows: list[dict]) -> tuple[Path, Path]:
    """(report.html, report.png) of ``eval_dir`` (module docstring)."""
    eval_dir = Path(eval_dir)
    return write_html(eval_dir, result, rows), write_png(eval_dir, result, rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.report", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = config_from_args(args, sections=("output_dir",))  # the report reads only the run's files
        eval_dir = Path(cfg.output_dir) / "eval"
        if not (eval_dir / "eval.json").is_file():
            raise PipelineError(f"{eval_dir / 'eval.json'} does not exist; run `python -m ppo_ddpm.eval` first")
        result = json.loads((eval_dir / "eval.json").read_text())
        paths = write_report(eval_dir, result, read_metrics(Path(cfg.output_dir) / "metrics.jsonl"))
        print(f"[report] wrote {paths[0]} and {paths[1]}")

    return run_cli("ppo_ddpm.report", argv, body)


if __name__ == "__main__":
    sys.exit(main())
