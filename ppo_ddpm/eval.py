"""Base vs fine-tuned DDPM on the same noise: ``python -m ppo_ddpm.eval --cfg FILE [--base P] [--finetuned P] [--control P]``.

Batch k of ``eval.batch_size`` samples draws x_T and every step's z from one generator seeded
``eval.seed + k``; the base model and the fine-tuned model consume the identical draws.
Reported (``{output_dir}/eval/eval.json``, TensorBoard under ``{output_dir}/tb``, tag ``eval/``):

- reward mean and std (population, ddof 0) of each model, over its finite rewards: NaN / inf
  rewards are excluded and counted (``<model>_nonfinite_rewards``, model = base, finetuned, control);
- win rate = mean_b [r_ft,b > r_base,b] (same noise b) over the ``win_rate_pairs`` pairs where both
  rewards are finite; gains and their standard errors likewise over finite rewards / pairs;
- per-step KL drift along the fine-tuned trajectory, over the stochastic (policy) steps, with
  s_t = max(sigma_t, ppo.sigma_floor): KL_t = mean_b ||mu_ft(x_t) - mu_base(x_t)||^2 / (2 s_t^2),
  x_t the fine-tuned state; ``kl_drift_total`` = sum_t KL_t (the KL of the two trajectory
  distributions, given the same x_T; deterministic steps are the environment's and carry none);
- diversity = mean pairwise L2 distance ||x0_i - x0_j|| over the samples of one model; it, the image
  statistics and KID use the samples whose pixels are all finite (the others counted in
  ``<model>_nonfinite_images``).

A value that is not finite (a diverged model) is written as ``null``: eval.json is always valid JSON,
and a fine-tuned model with non-finite rewards or samples gets the verdict ``non-finite``.

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

from .config import Config, add_config_args, config_from_args, validate_config
from .ddpm.ddim import DDIMPlan, ddim_step_reference
from .ddpm.model import load_model
from .ddpm.sample import ddim_loop, ddim_sample
from .plots import BASE_COLOUR, FT_COLOUR, per_step_figure, reward_curve, reward_histogram, save_figure, upscale
from .ppo.rollout import check_policy_steps
from .quality import IMAGE_STATS, RandomFeatures, image_stats, kid_from_features, mean_pairwise_distance
from .utils import resolve_device
from .utils.checkpoint import CheckpointError, atomic_write_text
from .utils.cli import run_cli
from .utils.finite import finite_or_none, format_number
from .utils.lock import RunLock

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
    """Up to ``limit`` of the images the base model was trained on (``pretrain.load_training_data``:
    ``data.root/real``, else ``data.root``, or its class folders for a class-conditional model), a fixed
    random subset when there are more; None when the run has no data folder (e.g. a pretrained model with
    a JPEG reward) or it holds no readable images (said on stderr)."""
    from .data import DataError
    from .pretrain import load_training_data

    if not cfg.data.root or not Path(cfg.data.root).is_dir():
        return None
    try:
        images, _ = load_training_data(cfg)
    except DataError as e:
        print(f"[eval] no real images to compare with ({e}); KID and the off-data verdict are skipped", file=sys.stderr)
        return None
    if len(images) > limit:  # class folders come in order: a random subset, not the first classes
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit]]
    return images


def _mean(r: np.ndarray) -> float | None:
    """Mean of the finite values of ``r``; None when there are none (or it overflows)."""
    r = r[np.isfinite(r)]
    return finite_or_none(float(r.mean())) if r.size else None


def _std(r: np.ndarray) -> float | None:
    r = r[np.isfinite(r)]
    return finite_or_none(float(r.std())) if r.size else None


def _gain(a: np.ndarray, b: np.ndarray) -> float | None:
    """mean(a) - mean(b), each over its finite values; None when either has none."""
    ma, mb = _mean(a), _mean(b)
    return None if ma is None or mb is None else finite_or_none(ma - mb)


def _paired_se(a: np.ndarray, b: np.ndarray) -> float | None:
    """Standard error of mean(a - b) over the paired samples (same noise) where both are finite; None
    with fewer than two such pairs."""
    both = np.isfinite(a) & np.isfinite(b)
    d = a[both] - b[both]
    return finite_or_none(float(d.std(ddof=1) / np.sqrt(len(d)))) if len(d) > 1 else None


def _finite_samples(x: torch.Tensor) -> torch.Tensor:
    """The samples of x [N, ...] whose every value is finite."""
    return x[torch.isfinite(x).flatten(1).all(dim=1)]


def _diversity(x: torch.Tensor) -> float | None:
    """Mean pairwise distance of samples x [N, ...] (their finite ones); None with fewer than two."""
    return finite_or_none(mean_pairwise_distance(x)) if len(x) > 1 else None


def _image_report(x: torch.Tensor, real_features: torch.Tensor | None, features) -> dict:
    """``quality.image_stats`` of samples x [N, 3, S, S] (finite ones) and, given the real images' features
    [M, F] (``features`` of them, computed once per evaluation), the KID (``quality.kid``) of x to them; a
    value that cannot be measured (no samples, fewer than two for KID, overflow) is None."""
    stats = dict.fromkeys(IMAGE_STATS) if len(x) == 0 else {k: finite_or_none(v) for k, v in image_stats(x).items()}
    if real_features is not None:
        stats["kid"] = (finite_or_none(kid_from_features(features(x.cpu()), real_features))
                        if len(x) > 1 and len(real_features) > 1 else None)
    return stats


# Heuristic thresholds of the verdict (docs/objective.md explains them).
COLLAPSE_DIVERSITY = 0.8  # fine-tuned diversity below this fraction of the base's: mode collapse
DRIFT_KID = 1.25  # KID to the real data above this multiple of the base's: moved away from the data
GRAIN = 1.25  # grain above this multiple of max(base, real): noise texture


def verdict(r: dict) -> tuple[str, list[str]]:
    """(label, reasons) from an ``evaluate`` summary: ``improved``, ``no gain``, ``no gain over control``,
    ``collapsed``, ``off-data`` (the samples moved away from the real data: KID or grain; for a learned
    reward of realism this is reward hacking, for a JPEG reward it can be the point) or ``non-finite`` (the
    fine-tuned model's rewards or samples hold NaN / inf). Several reasons can apply; the label is the first
    of: non-finite, collapsed, off-data, no gain over control, no gain, improved. A comparison whose values
    are not known (None) is not made, except that an unknown gain counts as no gain."""
    reasons = []
    bad_r, bad_x = r.get("finetuned_nonfinite_rewards", 0), r.get("finetuned_nonfinite_images", 0)
    if bad_r or bad_x:
        reasons.append(f"non-finite: {bad_r} NaN/inf rewards and {bad_x} samples with NaN/inf pixels "
                       f"of {r['num_samples']} from the fine-tuned model")
    fd, bd = r["finetuned_diversity"], r["base_diversity"]
    if fd is not None and bd is not None and fd < COLLAPSE_DIVERSITY * bd:
        reasons.append(f"collapsed: diversity {fd:.3g} < {COLLAPSE_DIVERSITY} x base {bd:.3g}")
    real = r.get("real")
    if real is not None:
        fk, bk = r["finetuned"].get("kid"), r["base"].get("kid")
        if fk is not None and bk is not None and fk > DRIFT_KID * bk:
            reasons.append(f"off-data: KID to real data {fk:.4g} > {DRIFT_KID} x base {bk:.4g}")
        grains = (r["finetuned"]["grain"], r["base"]["grain"], real["grain"])
        if None not in grains and grains[0] > GRAIN * max(grains[1:]):
            reasons.append(f"off-data: grain {grains[0]:.3g} > {GRAIN} x max(base, real) {max(grains[1:]):.3g}")
    gains = [("no gain", "reward gain", r["reward_gain"], r["reward_gain_se"])]
    if "gain_over_control" in r:
        gains.append(("no gain over control", "fine-tuned over control", r["gain_over_control"], r["gain_over_control_se"]))
    for label, what, gain, se in gains:
        if gain is None or se is None:
            reasons.append(f"{label}: {what} {format_number(gain, '+.4g')} (standard error {format_number(se, '.3g')}) "
                           "cannot be measured")
        elif gain <= 2 * se:
            reasons.append(f"{label}: {what} {gain:+.4g} <= 2 x its standard error {se:.3g}")
    for label in ("non-finite", "collapsed", "off-data", "no gain over control", "no gain"):
        if any(x.startswith(label + ":") for x in reasons):
            return label, reasons
    return "improved", reasons


def evaluate(cfg: Config, base_path: str, finetuned_path: str, step: int | None = None, control_path: str | None = None) -> dict:
    """Compare the two models (and a random-reward ``control``) on ``cfg.eval.num_samples`` shared noises;
    write the artefacts; return the summary (module docstring)."""
    from .reward import build_reward

    validate_config(cfg)  # also: the plan has stochastic steps, where s_t = max(sigma_t, ppo.sigma_floor) > 0
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
    ok = {k: np.isfinite(v) for k, v in r.items()}
    pairs = ok["base"] & ok["finetuned"]
    finite_x = {k: _finite_samples(v) for k, v in x.items()}
    kl_steps = torch.cat(kls, dim=1).mean(dim=1)
    result = {"num_samples": int(len(r["base"]))}
    for name in models:
        result.update({f"{name}_nonfinite_rewards": int((~ok[name]).sum()),
                       f"{name}_nonfinite_images": int(len(x[name]) - len(finite_x[name]))})
    result.update({
        "base_reward_mean": _mean(r["base"]), "base_reward_std": _std(r["base"]),
        "finetuned_reward_mean": _mean(r["finetuned"]), "finetuned_reward_std": _std(r["finetuned"]),
        "reward_gain": _gain(r["finetuned"], r["base"]),
        "reward_gain_se": _paired_se(r["finetuned"], r["base"]),
        "win_rate": _mean((r["finetuned"][pairs] > r["base"][pairs]).astype(np.float64)), "win_rate_pairs": int(pairs.sum()),
        "kl_drift_total": finite_or_none(float(kl_steps.sum())),
        "kl_drift_per_step": [finite_or_none(float(v)) for v in kl_steps],
        "timesteps": [int(plan.timesteps[i]) for i in steps],
        "base_diversity": _diversity(finite_x["base"]), "finetuned_diversity": _diversity(finite_x["finetuned"]),
        "base_rewards": [finite_or_none(float(v)) for v in r["base"]],
        "finetuned_rewards": [finite_or_none(float(v)) for v in r["finetuned"]],
        "base_path": str(base_path), "finetuned_path": str(finetuned_path), "seed": cfg.eval.seed,
    })
    if control_path:
        result.update(control_path=str(control_path), control_reward_mean=_mean(r["control"]),
                      control_reward_gain=_gain(r["control"], r["base"]),
                      gain_over_control=_gain(r["finetuned"], r["control"]),
                      gain_over_control_se=_paired_se(r["finetuned"], r["control"]))
    real = real_images(cfg)
    features = RandomFeatures()
    real_features = features(real.cpu()) if real is not None else None
    for name, images in finite_x.items():
        result[name] = _image_report(images, real_features, features)
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
    atomic_write_text(json.dumps(result, indent=2, allow_nan=False), out / "eval.json")  # non-finite: null
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
            v = np.asarray(result[tag], dtype=np.float64)  # None (non-finite) -> NaN, left out
            if np.isfinite(v).any():  # linear bins: TensorBoard's default buckets end at 1e20 and drop larger rewards
                w.add_histogram(f"eval/{tag}", v[np.isfinite(v)], step, bins=20)
        for name, image in images.items():
            w.add_image(f"eval/{name}", image, step, dataformats="HWC")


def format_summary(r: dict) -> str:
    """Human-readable lines: rewards, gains (over the control too), distance to the real data, verdict;
    a value that was not finite reads ``n/a``, and NaN / inf rewards or samples of a model are counted."""
    n = format_number
    lines = [
        f"[eval] {r['num_samples']} samples, same noise for every model",
        f"[eval] base       mean reward {n(r['base_reward_mean'], '+.4f')} (std {n(r['base_reward_std'], '.4f')}), "
        f"diversity {n(r['base_diversity'], '.3f')}",
        f"[eval] fine-tuned mean reward {n(r['finetuned_reward_mean'], '+.4f')} (std {n(r['finetuned_reward_std'], '.4f')}), "
        f"diversity {n(r['finetuned_diversity'], '.3f')}",
        f"[eval] reward gain {n(r['reward_gain'], '+.4f')} (se {n(r['reward_gain_se'], '.3f')}), "
        f"win rate {n(r['win_rate'], '.3f')}, KL drift from base {n(r['kl_drift_total'], '.4g')} nats",
    ]
    if "gain_over_control" in r:
        lines.append(f"[eval] random-reward control: gain {n(r['control_reward_gain'], '+.4f')}; fine-tuned over control "
                     f"{n(r['gain_over_control'], '+.4f')} (se {n(r['gain_over_control_se'], '.3f')})")
    if "real" in r:
        b, f, real = r["base"], r["finetuned"], r["real"]
        lines.append(f"[eval] vs real data ({real['num_images']} images): KID base {n(b['kid'], '.4f')}, fine-tuned "
                     f"{n(f['kid'], '.4f')}; grain real {n(real['grain'], '.3f')}, base {n(b['grain'], '.3f')}, "
                     f"fine-tuned {n(f['grain'], '.3f')}")
    for name in ("base", "finetuned", "control"):
        bad_r, bad_x = r.get(f"{name}_nonfinite_rewards", 0), r.get(f"{name}_nonfinite_images", 0)
        if bad_r:
            used = (f"mean, std, gains and the win rate ({r['win_rate_pairs']} pairs left)" if name != "control"
                    else "mean and the gains over the control")
            lines.append(f"[eval] warning: {bad_r} of {r['num_samples']} {name} rewards are NaN/inf: excluded from its {used}")
        if bad_x:
            lines.append(f"[eval] warning: {bad_x} of {r['num_samples']} {name} samples hold NaN/inf pixels: excluded "
                         "from its diversity, image statistics and KID")
    lines.append(f"[eval] verdict: {r['verdict']}" + "".join(f"\n[eval]   {x}" for x in r["verdict_reasons"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .pipeline import prepare

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_config_args(argparse.ArgumentParser(prog="python -m ppo_ddpm.eval", description=__doc__.split("\n")[0]))
    parser.add_argument("--base", default=None, help="base model (default: model.pretrained or the run's pretrained model)")
    parser.add_argument("--finetuned", default=None, help="fine-tuned model (default: {output_dir}/finetuned.pth)")
    parser.add_argument("--control", default=None,
                        help="a model fine-tuned with reward.kind: random for the same budget (the random-reward control)")
    args = parser.parse_args(argv)
    if args.base is not None:  # as an override, so a diffusers folder brings its scheduler config
        args.overrides = [*args.overrides, f"model.pretrained={json.dumps(args.base)}"]

    def body() -> None:
        cfg = config_from_args(args)
        with RunLock(cfg.output_dir):
            cfg = prepare(cfg, run=False)  # the run's data too: KID and grain against its real images
            finetuned = args.finetuned or str(Path(cfg.output_dir) / "finetuned.pth")
            if not Path(finetuned).exists():
                raise CheckpointError(f"fine-tuned model {finetuned} does not exist; run `python -m ppo_ddpm.finetune` "
                                      "or pass --finetuned")
            result = evaluate(cfg, cfg.model.pretrained, finetuned, control_path=args.control)
        print(format_summary(result))
        print(f"[eval] wrote {Path(cfg.output_dir) / 'eval'}/eval.json, report.html, report.png and the figures")

    return run_cli("ppo_ddpm.eval", argv, body)


if __name__ == "__main__":
    sys.exit(main())
