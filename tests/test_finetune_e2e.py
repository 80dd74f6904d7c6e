"""The embedded default end to end: procedural data -> pretrain -> reward model -> PPO -> eval.

``python -m ppo_ddpm.finetune`` with the embedded default's objective and sizes, shortened to 20 PPO
iterations (the default runs 40). What a user measures must hold on seed 0: PPO's trust region acts
(clip fraction within 2-40%, at least half the samples keep a gradient, no single DDIM step carries
most of the ratio, the lr warm-up keeps the first iteration's approx-KL small), the reward rises beyond its standard error, the samples keep their diversity and
the verdict is "improved"; and every artefact exists.
"""
import json
import os
import subprocess
import sys

import pytest

from ppo_ddpm.config import load_config
from ppo_ddpm.utils.checkpoint import safe_load

SHORT = ["ppo.iterations=20", "logging.sample_every=4", "logging.ckpt_every=5", "device=cpu", "seed=0"]


@pytest.mark.slow
def test_embedded_default_engages_ppo_and_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    sets = SHORT + [f"output_dir={out}"]
    # Triton's CPU interpreter (set by conftest) is only for the kernel tests: CPU tensors run the reference
    # one thread: tiny tensors gain nothing from more, and it keeps the run steady on a busy machine
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "ppo_ddpm.finetune", *sum((["--set", s] for s in sets), [])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "base       mean reward" in proc.stdout and "fine-tuned mean reward" in proc.stdout

    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["reward_gain"] > 2 * result["reward_gain_se"], result
    assert result["num_samples"] == 64 and result["win_rate"] > 0.5
    assert result["finetuned_diversity"] >= 0.8 * result["base_diversity"]
    assert result["verdict"] == "improved", result["verdict_reasons"]

    cfg = load_config(None, sets)
    ckpt = safe_load(out / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == cfg.ppo.iterations and (out / "checkpoints" / "prev.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(cfg.ppo.iterations))
    for key in ("reward_mean", "grad_norm", "samples_per_s", "loss", "time_update", "keep_frac", "clipfrac",
                "step_clipfrac", "global_clipfrac", "log_ratio_raw_mean", "log_ratio_raw_abs_max", "approx_kl",
                "top_step_share", "top_step", "lr"):
        assert key in rows[0], key
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731  (off-policy minibatches of each iteration)
    assert 0.02 <= mean("clipfrac") <= 0.40, mean("clipfrac")
    assert mean("keep_frac") >= 0.5, mean("keep_frac")
    assert mean("top_step_share") < 0.5, mean("top_step_share")
    assert rows[0]["approx_kl"] < 0.5 and rows[0]["lr"] < cfg.ppo.lr == rows[-1]["lr"], rows[0]  # warm-up
    for name in ("finetuned.pth", "ddpm.pth", "reward_model.safetensors", "pipeline.json",
                 "eval/side_by_side.png", "eval/reward_hist.png", "samples/iter_000004.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    stages = json.loads((out / "pipeline.json").read_text())
    assert set(stages) == {"data", "pretrain", "reward"}
