"""A real image set through the whole pipeline: scikit-learn's bundled 8x8 digits as data.root."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppo_ddpm.data import load_images
from ppo_ddpm.data.digits import digits_images, main
from ppo_ddpm.reward import load_reward_model

datasets = pytest.importorskip("sklearn.datasets")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_digits_written_as_class_folders_exactly(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--per-class", "3"]) == 0
    assert "wrote 30 images" in capsys.readouterr().out
    ref = datasets.load_digits()
    for d in range(10):
        files = sorted((tmp_path / "d" / str(d)).glob("digit_*.png"))
        assert len(files) == 3
        first = ref.images[np.flatnonzero(ref.target == d)[0]]
        png = np.asarray(Image.open(files[0]))
        assert png.shape == (8, 8, 3) and (png == np.round(first * 255 / 16)[..., None]).all()
    x = load_images(tmp_path / "d" / "7", 16)  # the loader upscales to data.image_size
    assert x.shape == (3, 3, 16, 16) and -1 <= x.min() and x.max() <= 1
    images, labels = digits_images(per_class=2)
    assert images.shape == (20, 3, 8, 8) and labels.tolist() == sorted(list(range(10)) * 2)
    assert main([str(tmp_path / "e"), "--per-class", "0"]) == 2


@pytest.mark.slow
def test_pipeline_runs_on_the_digits(tmp_path):
    """configs/digits.yaml at tiny size: class-conditional pretraining, classifier reward, PPO, eval."""
    data, out = tmp_path / "data", tmp_path / "run"
    assert main([str(data), "--per-class", "6"]) == 0
    sets = [f"data.root={data}", f"output_dir={out}", "device=cpu", "model.sample_size=8", "data.image_size=8",
            "model.base_channels=8", "model.channel_mults=[1]", "model.attention_resolutions=[]",
            "pretrain.steps=3", "pretrain.batch_size=8", "reward.train_steps=3", "reward.hidden_channels=4",
            "reward.batch_size=20", "ppo.iterations=1", "ppo.batch_size=4", "ppo.microbatch=4",
            "sampling.num_inference_steps=2", "eval.num_samples=4", "logging.sample_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "ppo_ddpm.finetune", "--cfg", str(CONFIGS / "digits.yaml"),
                           *sum((["--set", s] for s in sets), [])], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = json.loads((out / "pipeline.json").read_text())
    assert set(stages) == {"pretrain", "reward"}  # data.root is given: no procedural data
    model, meta = load_reward_model(out / "classifier.safetensors")
    assert meta["class_names"] == [str(d) for d in range(10)] and model.config["num_classes"] == 10
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_mean"] <= 0 and "time_reward" in row  # log-probabilities of the asked-for digit
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["num_samples"] == 4 and all(r <= 0 for r in result["finetuned_rewards"])
    assert (out / "eval" / "report.html").is_file() and (out / "samples" / "iter_000001.png").is_file()
    assert torch.load(out / "finetuned.pth", weights_only=True)["config"]["num_classes"] == 10
