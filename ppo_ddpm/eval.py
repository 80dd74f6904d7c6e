"""Base vs fine-tuned DDPM on the same noise: ``python -m ppo_ddpm.eval --cfg FILE [--base P] [--finetuned P]``.

Batch k of ``eval.batch_size`` samples draws x_T and every step's z from one generator seeded
``eval.seed + k``; the base model and the fine-tuned model consume the identical draws.
Reported (``{output_dir}/eval/eval.json``, TensorBoard under ``{output_dir}/tb``, tag ``eval/``):

- reward mean and std (population, ddof 0) of each model;
- win rate = mean_b [r_ft,b > r_base,b] (same noise b);
- per-step KL drift along the fine-tuned trajectory, over the stochastic (policy) steps, with
  s_t = max(sigma_t, ppo.sigma_floor): KL_t = mean_b ||mu_ft(x_t) - mu_base(x_t)||^2 / (2 s_t^2),
  x_t the fine-tuned state; ``kl_drift_total`` = sum_t KL_t (the KL of the two trajectory
  distributions, given the same x_T; deterministic steps are the environment's and carry none);
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
from .ddpm.sample import ddim_loop, ddim_sample
from .plots import BASE_COLOUR, FT_COLOUR, per_step_figure, reward_curve, reward_histogram, save_figure, upscale
from .ppo.rollout import check_policy_steps
from .quality import mean_pairwise_distance
from .utils import resolve_device
from .utils.checkpoint import CheckpointError, atomic_write_text

GRID = 16  # samples shown per model in side_by_side.png


@torch.no_grad()
def finetuned_trajectory(ft, base, plan, x_T, class_labels, clip_x0, s, generator, steps: list[int], prediction_type="epsilon"):
    """Sample x_0 from ``ft`` (draws as ``ddim_sample``) -> (x_0 [B,...], KL [len(steps), B] float64).

    KL[j, b] = ||mu_ft - mu_base||^2 / (2 s_i^2) at the policy step i = steps[j], both means taken at
    the fine-tuned state x_i (deterministic steps are the environment's: no KL).
    """
    kl = torch.zeros(len(steps), x_T.shape[0], dtype=torch.float64, device=x_T.device)
    row = {i: j for j, i in enumerate(steps)}
    kw = dict(clip_x0=clip_x0, prediction_type=prediction_type)

    def visit(i, x, x_next, mu_ft, _log_prob):
        if i in row:
            t, *coefs = plan.step(i, x.shape[0])
            _, mu_base, _ = ddim_step_reference(x, base(x, t, class_labels), *coefs, x_prev=x_next, **kw)
            kl[row[i]] = (mu_ft.double() - mu_base.double()).pow(2).flatten(1).sum(1) / (2 * s[i].double() ** 2)

    draw = lambda i: torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)  # noqa: E731
    return ddim_loop(ft, plan, x_T, class_labels, noise=draw, visit=visit, **kw), kl


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


def real_images(cfg: Config, limit: int = 1024) -> torch.Tensor | None:
    """Up to ``limit`` images of ``{data.root}/real`` (the distribution the base model was trained on), or
    None when the run has no such folder (e.g. a pretrained model with a JPEG reward)."""
    from .data import load_images

    folder = Path(cfg.data.root) / "real" if cfg.data.root else None
    if folder is None or not folder.is_dir():
        return None
    return load_images(folder, cfg.model.sample_size)[:limit]


def _paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over paired samples (same noise)."""
    d = a - b
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")


# Heuristic thresholds of the verdict (docs/objective.md explains them).
COLLAPSE_DIVERSITY = 0.8  # fine-tuned diversity below this fraction of the base's: mode collapse
DRIFT_KID = 1.25  # KID to the real data above this multiple of the base's: moved away from the data
GRAIN = 1.25  # grain above this multiple of max(base, real): noise texture


def verdict(r: dict) -> tuple[str, list[str]]:
    """(label, reasons) from an ``evaluate`` summary: ``improved``, ``no gain``, ``no gain over control``,
    ``collapsed`` or ``hacked`` (reward up, but away from the real data or grainy). Several reasons can
    apply; the label is the first of: collapsed, hacked, no gain, no gain over control, improved."""
    reasons = []
    if r["finetuned_diversity"] < COLLAPSE_DIVERSITY * r["base_diversity"]:
        reasons.append(f"collapsed: diversity {r['finetuned_diversity']:.3g} < {COLLAPSE_DIVERSITY} x base {r['base_diversity']:.3g}")
    real = r.get("real")
    if real is not None:
        if r["finetuned"]["kid"] > DRIFT_KID * r["base"]["kid"]:
            reasons.append(f"hacked: KID to real data {r['finetuned']['kid']:.4g} > {DRIFT_KID} x base {r['base']['kid']:.4g}")
        grain_ref = max(r["base"]["grain"], real["grain"])
        if r["finetuned"]["grain"] > GRAIN * grain_ref:
            reasons.append(f"hacked: grain {r['finetuned']['grain']:.3g} > {GRAIN} x max(base, real) {grain_ref:.3g}")
    if r["reward_gain"] <= 2 * r["reward_gain_se"]:
        reasons.append(f"no gain: reward gain {r['reward_gain']:+.4g} <= 2 x its standard error {r['reward_gain_se']:.3g}")
    if "gain_over_control" in r and r["gain_over_control"] <= 2 * r["gain_over_control_se"]:
        reasons.append(f"no gain over control: {r['gain_over_control']:+.4g} <= 2 x its standard error {r['gain_over_control_se']:.3g}")
    for label in ("collapsed", "hacked", "no gain over control", "no gain"):
        if any(x.startswith(label + ":") for x in reasons):
            return label, reasons
    return "improved", reasons


def evaluate(cfg: Config, base_path: str, finetuned_path: str, step: int | None = None, control_path: str | None = None) -> dict:
    """Compare the two models (and a random-reward ``control``) on ``cfg.eval.num_samples`` shared noises;
    write the artefacts; return the summary (module docstring)."""
    from .quality import RandomFeatures, image_stats, kid
    from .reward import build_reward

    if cfg.eval.num_samples < 1 or cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.num_samples and eval.batch_size must be >= 1, got {cfg.eval.num_samples}, {cfg.eval.batch_size}")
    device = resolve_device(cfg.device)
    models = {"base": load_model(base_path, cfg.model).to(device).eval(),
              "finetuned": load_model(finetuned_path, cfg.model).to(device).eval()}
    if control_path:
        models["control"] = load_model(control_path, cfg.model).to(device).eval()
    reward_fn = build_reward(cfg.reward, device)
    sc = cfg.sampling
    plan = DDIMPlan.from_config(cfg).to(device)
    steps = check_policy_steps(plan, cfg.ppo.sigma_floor)
    s = plan.sigma.clamp_min(cfg.ppo.sigma_floor)
    shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
    xs, rs, kls = {k: [] for k in models}, {k: [] for k in models}, []
    for k, start in enumerate(range(0, cfg.eval.num_samples, cfg.eval.batch_size)):
        B = min(cfg.eval.batch_size, cfg.eval.num_samples - start)
        gen = torch.Generator(device=device).manual_seed(cfg.eval.seed + k)
        x_T = torch.randn((B, *shape), generator=gen, device=device)
        labels = (torch.randint(cfg.model.num_classes, (B,), generator=gen, device=device)
                  if cfg.model.num_classes > 0 else None)
        noise_state = gen.get_state()
        pred = cfg.model.prediction_type
        for name, model in models.items():
            gen.set_state(noise_state)  # every model consumes the identical draws
            if name == "finetuned":
                x, kl = finetuned_trajectory(model, models["base"], plan, x_T, labels, sc.clip_x0, s, gen, steps, pred)
                kls.append(kl.cpu())
            else:
                x = ddim_sample(model, plan, x_T, labels, clip_x0=sc.clip_x0, generator=gen, prediction_type=pred)
            xs[name].append(x.float().cpu())
            rs[name].append(reward_fn(x, labels).double().cpu())
    x = {k: torch.cat(v) for k, v in xs.items()}
    r = {k: torch.cat(v).numpy() for k, v in rs.items()}
    kl_steps = torch.cat(kls, dim=1).mean(dim=1)
    result = {
        "num_samples": int(len(r["base"])),
        "base_reward_mean": float(r["base"].mean()), "base_reward_std": float(r["base"].std()),
        "finetuned_reward_mean": float(r["finetuned"].mean()), "finetuned_reward_std": float(r["finetuned"].std()),
        "reward_gain": float(r["finetuned"].mean() - r["base"].mean()),
        "reward_gain_se": _paired_se(r["finetuned"], r["base"]),
        "win_rate": float((r["finetuned"] > r["base"]).mean()),
        "kl_drift_total": float(kl_steps.sum()),
        "kl_drift_per_step": [float(v) for v in kl_steps],
        "timesteps": [int(plan.timesteps[i]) for i in steps],
        "base_diversity": mean_pairwise_distance(x["base"]), "finetuned_diversity": mean_pairwise_distance(x["finetuned"]),
        "base_rewards": [float(v) for v in r["base"]], "finetuned_rewards": [float(v) for v in r["finetuned"]],
        "base_path": str(base_path), "finetuned_path": str(finetuned_path), "seed": cfg.eval.seed,
    }
    if control_path:
        result.update(control_path=str(control_path), control_reward_mean=float(r["control"].mean()),
                      control_reward_gain=float(r["control"].mean() - r["base"].mean()),
                      gain_over_control=float(r["finetuned"].mean() - r["control"].mean()),
                      gain_over_control_se=_paired_se(r["finetuned"], r["control"]))
    real = real_images(cfg)
    features = RandomFeatures()
    for name, images in x.items():
        result[name] = image_stats(images)
        if real is not None:
            result[name]["kid"] = kid(images, real, features)
    if real is not None:
        result["real"] = {**image_stats(real), "num_images": int(real.shape[0])}
    result["verdict"], result["verdict_reasons"] = verdict(result)
    _write_artefacts(cfg, result, x["base"], x["finetuned"], step)
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
    """Human-readable lines: rewards, gains (over the control too), distance to the real data, verdict."""
    lines = [
        f"[eval] {r['num_samples']} samples, same noise for every model",
        f"[eval] base       mean reward {r['base_reward_mean']:+.4f} (std {r['base_reward_std']:.4f}), diversity {r['base_diversity']:.3f}",
        f"[eval] fine-tuned mean reward {r['finetuned_reward_mean']:+.4f} (std {r['finetuned_reward_std']:.4f}), diversity {r['finetuned_diversity']:.3f}",
        f"[eval] reward gain {r['reward_gain']:+.4f} (se {r['reward_gain_se']:.3f}), win rate {r['win_rate']:.3f}, "
        f"KL drift from base {r['kl_drift_total']:.4g} nats",
    ]
    if "gain_over_control" in r:
        lines.append(f"[eval] random-reward control: gain {r['control_reward_gain']:+.4f}; fine-tuned over control "
                     f"{r['gain_over_control']:+.4f} (se {r['gain_over_control_se']:.3f})")
    if "real" in r:
        lines.append("[eval] vs real data ({} images): KID base {:.4f}, fine-tuned {:.4f}; grain real {:.3f}, base {:.3f}, "
                     "fine-tuned {:.3f}".format(r["real"]["num_images"], r["base"]["kid"], r["finetuned"]["kid"],
                                                r["real"]["grain"], r["base"]["grain"], r["finetuned"]["grain"]))
    lines.append(f"[eval] verdict: {r['verdict']}" + "".join(f"\n[eval]   {x}" for x in r["verdict_reasons"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .pipeline import PipelineError, prepare
    from .reward import RewardError

    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.eval", description=__doc__.split("\n")[0]))
    parser.add_argument("--base", default=None, help="base model (default: model.pretrained or the run's pretrained model)")
    parser.add_argument("--finetuned", default=None, help="fine-tuned model (default: {output_dir}/finetuned.pth)")
    parser.add_argument("--control", default=None,
                        help="a model fine-tuned with reward.kind: random for the same budget (the random-reward control)")
    args = parser.parse_args(argv)
    try:
        if args.base is not None:  # as an override, so a diffusers folder brings its scheduler config
            args.overrides = [*args.overrides, f"model.pretrained={json.dumps(args.base)}"]
        cfg = config_from_args(args)
        cfg = prepare(cfg, run=False, stages=("pretrain", "reward"))
        finetuned = args.finetuned or str(Path(cfg.output_dir) / "finetuned.pth")
        if not Path(finetuned).exists():
            raise CheckpointError(f"fine-tuned model {finetuned} does not exist; run `python -m ppo_ddpm.finetune` or pass --finetuned")
        result = evaluate(cfg, cfg.model.pretrained, finetuned, control_path=args.control)
    except (ConfigError, CheckpointError, PipelineError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"[eval] wrote {Path(cfg.output_dir) / 'eval'}/eval.json, report.html, report.png and the figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
