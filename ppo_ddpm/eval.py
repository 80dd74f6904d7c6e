"""Base vs fine-tuned DDPM on the same noise: ``python -m ppo_ddpm.eval --cfg FILE [--base P] [--finetuned P]``.

Batch k of ``eval.batch_size`` samples draws x_T and every step's z from one generator seeded
``eval.seed + k``; the base model and the fine-tuned model consume the identical draws.
Reported (``{output_dir}/eval/eval.json``, TensorBoard under ``{output_dir}/tb``, tag ``eval/``):

- reward mean and std (population, ddof 0) of each model;
- win rate = mean_b [r_ft,b > r_base,b] (same noise b);
- per-step KL drift along the fine-tuned trajectory, with s_t = max(sigma_t, ppo.sigma_floor):
  KL_t = mean_b ||mu_ft(x_t) - mu_base(x_t)||^2 / (2 s_t^2), x_t the fine-tuned state;
  ``kl_drift_total`` = sum_t KL_t (the KL of the two trajectory distributions, given the same x_T);
- diversity = mean pairwise L2 distance ||x0_i - x0_j|| over the samples of one model.

Images: ``side_by_side.png`` (base | fine-tuned, same noise in the same grid cell), and drawn with
matplotlib ``reward_hist.png``, ``kl_per_step.png`` (KL_t against t) and, after a PPO run,
``reward_curve.png`` (reward over iterations, from metrics.jsonl); all of them on one page in
``report.html`` / ``report.png`` (``ppo_ddpm.report``). Defaults: base = ``model.pretrained`` (or the run's pretrained model from
pipeline.json), fine-tuned = ``{output_dir}/finetuned.pth``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import Config, ConfigError, add_config_args, config_from_args
from .ddpm.ddim import DDIMPlan, ddim_step_reference
from .ddpm.model import load_model
from .ddpm.sample import ddim_sample
from .plots import BASE_COLOUR, FT_COLOUR, per_step_figure, reward_curve, reward_histogram, save_figure, upscale
from .ppo.rollout import check_sigma_floor
from .utils import resolve_device
from .utils.checkpoint import CheckpointError, atomic_write_text

GRID = 16  # samples shown per model in side_by_side.png


@torch.no_grad()
def finetuned_trajectory(ft, base, plan, x_T, class_labels, clip_x0, s, generator, prediction_type="epsilon"):
    """Sample x_0 from ``ft`` (draws as ``ddim_sample``) -> (x_0 [B,...], KL [n, B] float64).

    KL[i, b] = ||mu_ft - mu_base||^2 / (2 s_i^2) with both means taken at the fine-tuned state x_t.
    """
    x = x_T
    kl = torch.zeros(plan.num_steps, x_T.shape[0], dtype=torch.float64, device=x_T.device)
    for i in range(plan.num_steps):
        t, *step = plan.step(i, x.shape[0])
        kw = dict(clip_x0=clip_x0, prediction_type=prediction_type)
        x_next, mu_ft, _ = ddim_step_reference(x, ft(x, t, class_labels), *step, generator=generator, **kw)
        _, mu_base, _ = ddim_step_reference(x, base(x, t, class_labels), *step, x_prev=x_next, **kw)
        kl[i] = (mu_ft.double() - mu_base.double()).pow(2).flatten(1).sum(1) / (2 * s[i].double() ** 2)
        x = x_next
    return x, kl


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """mean_{i<j} ||x_i - x_j||_2 over the flattened samples (float64); 0 for one sample."""
    if x.shape[0] < 2:
        return 0.0
    return torch.pdist(x.flatten(1).double()).mean().item()


def side_by_side(x_base: torch.Tensor, x_ft: torch.Tensor, path: Path) -> tuple[Path, np.ndarray]:
    """PNG of the base grid (left) and the fine-tuned grid (right), each >= 256 px across and labelled
    -> (path, the image as uint8 [H, W, 3])."""
    from .data import make_grid

    a, b = (Image.fromarray(upscale(make_grid(x, nrow=4), 256), "RGB") for x in (x_base, x_ft))
    pad, head = 12, 18
    im = Image.new("RGB", (a.width + b.width + 3 * pad, max(a.height, b.height) + head + pad), "white")
    im.paste(a, (pad, head))
    im.paste(b, (2 * pad + a.width, head))
    draw = ImageDraw.Draw(im)
    draw.text((pad, 3), "base", fill=BASE_COLOUR)
    draw.text((2 * pad + a.width, 3), "fine-tuned", fill=FT_COLOUR)
    im.save(path)
    return path, np.asarray(im)


def evaluate(cfg: Config, base_path: str, finetuned_path: str, step: int | None = None) -> dict:
    """Compare the two models on ``cfg.eval.num_samples`` shared noises; write the artefacts; return the summary."""
    from .reward import build_reward

    if cfg.eval.num_samples < 1 or cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.num_samples and eval.batch_size must be >= 1, got {cfg.eval.num_samples}, {cfg.eval.batch_size}")
    device = resolve_device(cfg.device)
    base = load_model(base_path, cfg.model).to(device).eval()
    ft = load_model(finetuned_path, cfg.model).to(device).eval()
    reward_fn = build_reward(cfg.reward, device)
    sc = cfg.sampling
    plan = DDIMPlan.from_config(cfg).to(device)
    check_sigma_floor(plan, cfg.ppo.sigma_floor)  # the KL drift needs s_t = max(sigma_t, sigma_floor) > 0
    s = plan.sigma.clamp_min(cfg.ppo.sigma_floor)
    shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
    xs_b, xs_f, rs_b, rs_f, kls = [], [], [], [], []
    for k, start in enumerate(range(0, cfg.eval.num_samples, cfg.eval.batch_size)):
        B = min(cfg.eval.batch_size, cfg.eval.num_samples - start)
        gen = torch.Generator(device=device).manual_seed(cfg.eval.seed + k)
        x_T = torch.randn((B, *shape), generator=gen, device=device)
        labels = (torch.randint(cfg.model.num_classes, (B,), generator=gen, device=device)
                  if cfg.model.num_classes > 0 else None)
        noise_state = gen.get_state()
        pred = cfg.model.prediction_type
        x_b = ddim_sample(base, plan, x_T, labels, clip_x0=sc.clip_x0, generator=gen, prediction_type=pred)
        gen.set_state(noise_state)
        x_f, kl = finetuned_trajectory(ft, base, plan, x_T, labels, sc.clip_x0, s, gen, prediction_type=pred)
        xs_b.append(x_b.float().cpu())
        xs_f.append(x_f.float().cpu())
        rs_b.append(reward_fn(x_b, labels).double().cpu())
        rs_f.append(reward_fn(x_f, labels).double().cpu())
        kls.append(kl.cpu())
    x_b, x_f = torch.cat(xs_b), torch.cat(xs_f)
    r_b, r_f = torch.cat(rs_b).numpy(), torch.cat(rs_f).numpy()
    kl_steps = torch.cat(kls, dim=1).mean(dim=1)
    result = {
        "num_samples": int(len(r_b)),
        "base_reward_mean": float(r_b.mean()), "base_reward_std": float(r_b.std()),
        "finetuned_reward_mean": float(r_f.mean()), "finetuned_reward_std": float(r_f.std()),
        "reward_gain": float(r_f.mean() - r_b.mean()),
        "win_rate": float((r_f > r_b).mean()),
        "kl_drift_total": float(kl_steps.sum()),
        "kl_drift_per_step": [float(v) for v in kl_steps],
        "timesteps": [int(t) for t in plan.timesteps.cpu()],
        "base_diversity": mean_pairwise_distance(x_b), "finetuned_diversity": mean_pairwise_distance(x_f),
        "base_rewards": [float(v) for v in r_b], "finetuned_rewards": [float(v) for v in r_f],
        "base_path": str(base_path), "finetuned_path": str(finetuned_path), "seed": cfg.eval.seed,
    }
    _write_artefacts(cfg, result, x_b, x_f, step)
    return result


def _write_artefacts(cfg: Config, result: dict, x_b: torch.Tensor, x_f: torch.Tensor, step: int | None) -> None:
    """eval.json and the figures of ``{output_dir}/eval`` (module docstring), report.html / report.png, and
    TensorBoard: scalars, reward histograms, and the figures as image arrays (tag ``eval/``)."""
    from .report import read_metrics, write_report

    out = Path(cfg.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    images = {"side_by_side": side_by_side(x_b[:GRID], x_f[:GRID], out / "side_by_side.png")[1]}
    figures = {
        "reward_hist": reward_histogram(result["base_rewards"], result["finetuned_rewards"]),
        "kl_per_step": per_step_figure(result["timesteps"], result["kl_drift_per_step"], "KL_t (nats)",
                                       "KL drift from the base model, per DDIM step"),
    }
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    if rows:
        figures["reward_curve"] = reward_curve(rows)
    for name, fig in figures.items():
        images[name] = save_figure(fig, out / f"{name}.png")[1]
    atomic_write_text(json.dumps(result, indent=2), out / "eval.json")
    write_report(out, result, rows)
    if not cfg.logging.tensorboard:
        return
    from .run_logger import tensorboard_writer

    step = cfg.ppo.iterations if step is None else step
    with tensorboard_writer(cfg) as w:
        for k, v in result.items():
            if isinstance(v, float):
                w.add_scalar(f"eval/{k}", v, step)
        for tag in ("base_rewards", "finetuned_rewards"):
            v = np.asarray(result[tag], dtype=np.float64)
            if np.isfinite(v).any():
                w.add_histogram(f"eval/{tag}", v[np.isfinite(v)], step)
        for name, image in images.items():
            w.add_image(f"eval/{name}", image, step, dataformats="HWC")


def format_summary(r: dict) -> str:
    """Human-readable lines: both mean rewards, win rate, KL drift, diversity."""
    return "\n".join([
        f"[eval] {r['num_samples']} samples, same noise for both models",
        f"[eval] base       mean reward {r['base_reward_mean']:+.4f} (std {r['base_reward_std']:.4f}), diversity {r['base_diversity']:.3f}",
        f"[eval] fine-tuned mean reward {r['finetuned_reward_mean']:+.4f} (std {r['finetuned_reward_std']:.4f}), diversity {r['finetuned_diversity']:.3f}",
        f"[eval] reward gain {r['reward_gain']:+.4f}, win rate {r['win_rate']:.3f}, KL drift from base {r['kl_drift_total']:.4g} nats",
    ])


def main(argv: list[str] | None = None) -> int:
    from .pipeline import PipelineError, prepare
    from .reward import RewardError

    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.eval", description=__doc__.split("\n")[0]))
    parser.add_argument("--base", default=None, help="base model (default: model.pretrained or the run's pretrained model)")
    parser.add_argument("--finetuned", default=None, help="fine-tuned model (default: {output_dir}/finetuned.pth)")
    args = parser.parse_args(argv)
    try:
        if args.base is not None:  # as an override, so a diffusers folder brings its scheduler config
            args.overrides = [*args.overrides, f"model.pretrained={json.dumps(args.base)}"]
        cfg = config_from_args(args)
        cfg = prepare(cfg, run=False, stages=("pretrain", "reward"))
        finetuned = args.finetuned or str(Path(cfg.output_dir) / "finetuned.pth")
        if not Path(finetuned).exists():
            raise CheckpointError(f"fine-tuned model {finetuned} does not exist; run `python -m ppo_ddpm.finetune` or pass --finetuned")
        result = evaluate(cfg, cfg.model.pretrained, finetuned)
    except (ConfigError, CheckpointError, PipelineError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"[eval] wrote {Path(cfg.output_dir) / 'eval'}/eval.json, report.html, report.png and the figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
