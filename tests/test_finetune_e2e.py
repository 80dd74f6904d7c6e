"""The embedded default end to end, shortened: procedural data -> pretrain -> reward model -> PPO -> eval.

``python -m ppo_ddpm.finetune`` with tiny overrides; the fine-tuned model must score a higher
mean reward than the base model on the same noise, and every artefact must exist.
"""
import json
import os
import subprocess
import sys

import pytest

from ppo_ddpm.config import load_config
from ppo_ddpm.utils.checkpoint import safe_load

SHORT = [
    "model.sample_size=8", "data.image_size=8", "model.base_channels=16", "model.channel_mults=[1]",
    "model.attention_resolutions=[]", "data.procedural_count=128", "pretrain.steps=150", "pretrain.batch_size=32",
    "reward.train_steps=100", "reward.num_fake=128", "ppo.iterations=24", "ppo.batch_size=32", "ppo.microbatch=32",
    "sampling.num_inference_steps=6", "ppo.lr=0.003", "logging.sample_every=4", "logging.ckpt_every=5",
    "eval.num_samples=64", "device=cpu",
]


@pytest.mark.slow
def test_embedded_default_raises_the_reward(tmp_path):
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
    assert result["finetuned_reward_mean"] > result["base_reward_mean"], result
    assert result["num_samples"] == 64 and result["win_rate"] > 0.5

    cfg = load_config(None, sets)
    ckpt = safe_load(out / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == cfg.ppo.iterations and (out / "checkpoints" / "prev.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(cfg.ppo.iterations))
    for key in ("reward_mean", "grad_norm", "samples_per_s", "loss", "time_update"):
        assert key in rows[0]
    for name in ("finetuned.pth", "ddpm.pth", "reward_model.safetensors", "pipeline.json",
                 "eval/side_by_side.png", "eval/reward_hist.png", "samples/iter_000004.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    stages = json.loads((out / "pipeline.json").read_text())
    assert set(stages) == {"data", "pretrain", "reward"}
