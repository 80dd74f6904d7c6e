"""``python -m ppo_ddpm.study``: does the objective raise the reward for the right reason?

For every reward, objective variant and seed it fine-tunes the embedded default twice with the same
budget, once on the reward and once on ``reward.kind: random`` (the control: the same updates, driven
by noise), then evaluates both against the base model on the same noise (``ppo_ddpm.eval``) and
writes one table row: reward gain and gain over the control (with standard errors), win rate, the
training diagnostics (fraction of samples keeping a gradient, clip fraction, share of the ratio carried
by the largest step), diversity, KID and grain against the real data, the verdict and the wall time.

    python -m ppo_ddpm.study --out runs/study                       # the table of docs/objective.md
    python -m ppo_ddpm.study --variants default --rewards model --seeds 0   # one row
    python -m ppo_ddpm.study --signal --seeds 0                    # gradient signal at the base model only
    python -m ppo_ddpm.data.digits runs/digits/data                # a class-folder data set, then its classifier:
    python -m ppo_ddpm.study --cfg configs/digits.yaml --rewards classifier --variants default --out runs/study_digits

Each seed pretrains its own base model and reward model (the embedded pipeline, once per seed, shared
by every variant and reward of that seed). Runs are subprocesses (``--jobs`` at a time, one thread
each); a finished run (its finetuned.pth exists) is not trained again and a seed's recorded pipeline
stages are reused (an interrupted pretraining continues from its checkpoint), so an interrupted study
resumes and a finished one, run again, only re-evaluates. A value that is not finite (a diverged model)
reads ``n/a`` in the table and ``null`` in results.json.
Outputs under ``--out``: ``results.json`` (every row, merged with the rows of earlier invocations on the
same folder), ``table.md`` and ``grids/`` (base | fine-tuned
side-by-side PNGs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import load_config
from .utils.checkpoint import atomic_write_text
from .utils.cli import run_cli
from .utils.finite import finite_or_none, format_number
from .utils.lock import RunLock

# name -> overrides of the embedded default; the first is the shipped default itself
NO_WARMUP = ["ppo.lr_warmup_steps=0"]  # the comparison rows predate the lr warm-up: each changes one thing from "no warm-up"
VARIANTS = {
    "default": [],
    "no warm-up": NO_WARMUP,
    "no warm-up, grad_mask ppo": NO_WARMUP + ["ppo.grad_mask=ppo"],
    "no warm-up, log-odds reward": NO_WARMUP + ["reward.model_output=log_odds"],
    "no warm-up, sigma_floor 0.01": NO_WARMUP + ["ppo.sigma_floor=0.01"],
    "no warm-up, lr 5e-5": NO_WARMUP + ["ppo.lr=0.00005"],
    "trajectory-mean": NO_WARMUP + ["ppo.log_prob_reduction=mean"],
    "trajectory-mean, lr 2e-4": NO_WARMUP + ["ppo.log_prob_reduction=mean", "ppo.lr=0.0002"],
    "per_step (DDPO)": NO_WARMUP + ["ppo.objective=per_step", "ppo.log_prob_reduction=mean", "ppo.per_step_clip=null",
                                    "ppo.grad_mask=ppo"],
    "per_step (DDPO), lr 2e-4": NO_WARMUP + ["ppo.objective=per_step", "ppo.log_prob_reduction=mean",
                                             "ppo.per_step_clip=null", "ppo.grad_mask=ppo", "ppo.lr=0.0002"],
}
# name -> overrides of the config's reward; "model" is the config's own reward (the embedded default's
# real-vs-fake CNN); "classifier" needs class folders (e.g. --cfg configs/digits.yaml), so it is not run by default
REWARDS = {
    "model": [],
    "jpeg_compressibility": ["reward.kind=jpeg_compressibility"],
    "jpeg_incompressibility": ["reward.kind=jpeg_incompressibility"],
    "classifier": ["reward.kind=classifier"],
}
DEFAULT_REWARDS = ["model", "jpeg_compressibility", "jpeg_incompressibility"]
CONTROL = ["reward.kind=random"]
TRAIN_KEYS = ("keep_frac", "clipfrac", "top_step_share")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class RunFailed(RuntimeError):
    """A fine-tuning subprocess of the study exited with an error (its log is named)."""


def _run(args: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "ppo_ddpm.finetune", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(args)} failed (exit {proc.returncode}); see {log}")


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _train_means(run_dir: Path) -> dict[str, float]:
    from .report import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    values = {k: [r[k] for r in rows if k in r] for k in TRAIN_KEYS}  # absent (e.g. one epoch): None, not 0
    return {k: finite_or_none(sum(v) / len(v)) if v else None for k, v in values.items()}


def prepare_base(cfg_file: str | None, seed: int, out: Path, overrides: list[str] = ()) -> list[str]:
    """Run the embedded pipeline for ``seed`` once (data, pretrain, reward model; ``overrides`` as for every
    run); -> the overrides that point a run at its outputs. Run again, it reuses the stages pipeline.json
    records and continues an interrupted one (``resume``)."""
    from .pipeline import prepare

    folder = out / f"base_seed{seed}"
    cfg = load_config(cfg_file, [*overrides, f"seed={seed}", f"output_dir={folder}", "device=cpu"], validate=True)
    with RunLock(folder):
        cfg = prepare(cfg, resume=True)
    return [f"model.pretrained={cfg.model.pretrained}", f"reward.model_path={cfg.reward.model_path}",
            f"data.root={cfg.data.root}", f"seed={seed}", "device=cpu", "logging.tensorboard=false", "logging.sample_every=0"]


def run_dirs(out: Path, variant: str, reward: str, seed: int) -> tuple[Path, Path]:
    """(fine-tuned on the reward, control) run folders; the control is shared by every reward."""
    return (out / "runs" / _slug(reward) / _slug(variant) / f"seed{seed}",
            out / "runs" / "control" / _slug(variant) / f"seed{seed}")


def train(cfg_file: str | None, overrides: list[str], path: Path) -> float | None:
    """Fine-tune into ``path`` unless a finished run is there; -> wall seconds (None: done earlier)."""
    if (path / "finetuned.pth").is_file():  # written once, after the last PPO iteration
        return None
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    t0 = time.perf_counter()
    _run(([] if cfg_file is None else ["--cfg", cfg_file]) + _sets(overrides + [f"output_dir={path}"]), path.parent / f"{path.name}.log")
    return time.perf_counter() - t0


def run_overrides(base_sets: list[str], variant: str, reward_sets: list[str]) -> list[str]:
    """The overrides of one run: a seed's base, a variant, a reward (``REWARDS[name]`` or ``CONTROL``)."""
    return base_sets + VARIANTS[variant] + reward_sets


def evaluate_row(cfg_file: str | None, base_sets: list[str], variant: str, reward: str, seed: int, out: Path,
                 wall_s: float | None) -> dict:
    """Evaluate the fine-tuned model against the base and the control; summarise one row."""
    from .eval import evaluate

    run, ctrl = run_dirs(out, variant, reward, seed)
    cfg = load_config(cfg_file, run_overrides(base_sets, variant, REWARDS[reward]) + [f"output_dir={run}"])
    result = evaluate(cfg, cfg.model.pretrained, str(run / "finetuned.pth"), control_path=str(ctrl / "finetuned.pth"))
    grid = out / "grids" / f"{_slug(reward)}-{_slug(variant)}-seed{seed}.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "eval" / "side_by_side.png", grid)
    return {
        "reward": reward, "variant": variant, "seed": seed,
        "gain": result["reward_gain"], "gain_se": result["reward_gain_se"],
        "control_gain": result["control_reward_gain"], "gain_over_control": result["gain_over_control"],
        "gain_over_control_se": result["gain_over_control_se"], "win_rate": result["win_rate"],
        **_train_means(run),
        "diversity_ratio": _ratio(result["finetuned_diversity"], result["base_diversity"]),
        "kid_base": result["base"].get("kid"), "kid_finetuned": result["finetuned"].get("kid"),
        "grain_base": result["base"]["grain"], "grain_finetuned": result["finetuned"]["grain"],
        "grain_real": result.get("real", {}).get("grain"),
        "verdict": result["verdict"], "verdict_reasons": result["verdict_reasons"],
        "wall_s": wall_s, "grid": str(grid.relative_to(out)),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is unknown (a non-finite model) or b is 0."""
    return None if a is None or not b else finite_or_none(a / b)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (reward, variant, seed)."""
    head = ("| reward | variant | seed | gain ± se | control gain | gain over control ± se | win rate | keep | clip | "
            "top-step share | diversity ×base | KID ft / base | grain ft / base / real | verdict | PPO wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = lambda key, spec: format_number(r[key], spec)  # noqa: E731
        lines.append(
            f"| {r['reward']} | {r['variant']} | {r['seed']} | {f('gain', '+.3f')} ± {f('gain_se', '.3f')} | "
            f"{f('control_gain', '+.3f')} | {f('gain_over_control', '+.3f')} ± {f('gain_over_control_se', '.3f')} | "
            f"{f('win_rate', '.2f')} | {f('keep_frac', '.2f')} | {f('clipfrac', '.2f')} | {f('top_step_share', '.2f')} | "
            f"{f('diversity_ratio', '.2f')} | {f('kid_finetuned', '.4f')} / {f('kid_base', '.4f')} | "
            f"{f('grain_finetuned', '.3f')} / {f('grain_base', '.3f')} / {f('grain_real', '.3f')} | {r['verdict']} | "
            f"{f('wall_s', '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ppo_ddpm.study", description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", default=None, help="base config (default: the embedded default)")
    parser.add_argument("--out", default="runs/study", help="output folder (default: runs/study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", dest="extra_variants", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="add a variant, e.g. 'lr3e-5:ppo.lr=0.00003,ppo.num_epochs=2' (repeatable; run by default)")
    parser.add_argument("--variants", nargs="+", default=None, help=f"run only these variants (built in: {list(VARIANTS)})")
    parser.add_argument("--rewards", nargs="+", default=DEFAULT_REWARDS,
                        help=f"subset of {list(REWARDS)} (default: {' '.join(DEFAULT_REWARDS)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run (e.g. ppo.iterations=10)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--signal", action="store_true",
                        help="instead of training: the gradient signal of each row at the base model (signal.md)")
    parser.add_argument("--signal-batches", type=int, default=4, help="independent batches per --signal row")
    args = parser.parse_args(argv)
    for spec in args.extra_variants:
        name, sep, sets = spec.partition(":")
        if not sep or not name:
            print(f"error: --variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]", file=sys.stderr)
            return 2
        VARIANTS[name] = [x for x in sets.split(",") if x]
    if args.variants is None:
        args.variants = list(VARIANTS)
    for name, known in (("variant", VARIANTS), ("reward", REWARDS)):
        for v in getattr(args, name + "s"):
            if v not in known:
                print(f"error: unknown {name} {v!r}; known: {', '.join(known)}", file=sys.stderr)
                return 2
    out = Path(args.out)

    def body() -> None:
        for r in args.rewards:  # a bad config, override or reward (e.g. no class folders) fails before any run
            load_config(args.cfg, args.overrides + REWARDS[r], validate=True)
        with RunLock(out):  # one study per folder (each run locks its own folder too)
            if args.signal:
                rows = _signal(args, out)
                atomic_write_text(json.dumps(rows, indent=2, allow_nan=False), out / "signal.json")
                atomic_write_text(signal_table(rows), out / "signal.md")
                print(signal_table(rows))
                return
            rows = _merge(out / "results.json", _study(args, out))
            atomic_write_text(json.dumps(rows, indent=2, allow_nan=False), out / "results.json")
            atomic_write_text(table(rows), out / "table.md")
        print(table(rows))

    return run_cli("ppo_ddpm.study", argv, body, errors=(RunFailed,))


def _merge(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier results.json (other rewards, variants or seeds of this folder), updated
    with ``rows``, ordered by reward and variant as REWARDS and VARIANTS list them (others after, by
    name), then by seed."""
    key = lambda r: (r["reward"], r["variant"], r["seed"])  # noqa: E731
    merged = {key(r): r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    for r in rows:  # a run trained earlier is only re-evaluated now: it keeps the wall time recorded then
        earlier = merged.get(key(r), {})
        merged[key(r)] = {**r, "wall_s": earlier.get("wall_s")} if r.get("wall_s") is None else r
    rank = lambda names, name: (list(names).index(name) if name in names else len(names), name)  # noqa: E731
    return sorted(merged.values(), key=lambda r: (rank(REWARDS, r["reward"]), rank(VARIANTS, r["variant"]), r["seed"]))


def gradient_signal(cfg_file: str | None, overrides: list[str], batches: int = 4) -> dict:
    """The policy gradient at the base model (r = 1), per batch of ``ppo.batch_size`` rollouts:
    ``cosine`` = mean over pairs of independent batches of cos(g_a, g_b) (about SNR / (1 + SNR): 0 for
    pure noise, 1 for a noiseless gradient), and ``step_share`` = per trained DDIM step, its share of
    sum_t ||g_t||^2 with g_t the gradient of step t's terms alone (averaged over the batches)."""
    import itertools

    import torch

    from .ddpm.model import build_model
    from .ppo import PPOTrainer
    from .reward import build_reward

    cfg = load_config(cfg_file, overrides, validate=True)
    trainer = PPOTrainer(cfg, build_model(cfg.model), build_reward(cfg.reward, cfg.device), cfg.device)
    flat = lambda: torch.cat([q.grad.flatten() for q in trainer.params]).double()  # noqa: E731
    totals, per_step = [], []
    rows = torch.arange(cfg.ppo.batch_size)
    for b in range(batches):
        trainer.rollout(seed=10_000 + b)
        steps = torch.tensor(trainer.trained_steps)[None].expand(len(rows), -1)
        sq = []
        for k in range(steps.shape[1]):
            trainer.minibatch_gradient(rows, steps[:, k:k + 1])
            sq.append(float(flat().pow(2).sum()))
        trainer.minibatch_gradient(rows, steps)
        totals.append(flat())
        per_step.append(torch.tensor(sq) / sum(sq))
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(totals, 2)]
    return {"cosine": sum(cos) / len(cos), "steps": trainer.trained_steps,
            "timesteps": [int(trainer.plan.timesteps[i]) for i in trainer.trained_steps],
            "step_share": torch.stack(per_step).mean(0).tolist()}


def signal_table(rows: list[dict]) -> str:
    """Markdown: one line per (reward, variant, seed): cosine, largest step share, every step's share."""
    lines = ["| reward | variant | seed | cos(g_a, g_b) | largest step's share of the squared gradient norms | shares by timestep |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        shares = ", ".join(f"{t}: {v:.3f}" for t, v in zip(r["timesteps"], r["step_share"]))
        lines.append(f"| {r['reward']} | {r['variant']} | {r['seed']} | {r['cosine']:+.3f} | {max(r['step_share']):.3f} | {shares} |")
    return "\n".join(lines) + "\n"


def _signal(args: argparse.Namespace, out: Path) -> list[dict]:
    """The gradient signal of every (reward, variant, seed) at its seed's base model (no training)."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for s in args.seeds:
        base = prepare_base(args.cfg, s, out, args.overrides) + args.overrides
        for r in args.rewards:
            for v in args.variants:
                sig = gradient_signal(args.cfg, run_overrides(base, v, REWARDS[r]), args.signal_batches)
                rows.append({"reward": r, "variant": v, "seed": s, **sig})
    return rows


def _study(args: argparse.Namespace, out: Path) -> list[dict]:
    """Prepare every seed's base, train every run not finished yet, evaluate every row."""
    bases = {s: prepare_base(args.cfg, s, out, args.overrides) + args.overrides for s in args.seeds}
    rows_keys = [(v, r, s) for r in args.rewards for v in args.variants for s in args.seeds]
    trainings = {}  # run folder -> overrides; each control once per (variant, seed)
    for v, r, s in rows_keys:
        run, ctrl = run_dirs(out, v, r, s)
        trainings[run] = run_overrides(bases[s], v, REWARDS[r])
        trainings[ctrl] = run_overrides(bases[s], v, CONTROL)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        walls = dict(zip(trainings, pool.map(lambda item: train(args.cfg, item[1], item[0]), trainings.items())))
    return [evaluate_row(args.cfg, bases[s], v, r, s, out, walls[run_dirs(out, v, r, s)[0]]) for v, r, s in rows_keys]


if __name__ == "__main__":
    sys.exit(main())
