"""A very short epsilon-prediction pretraining run on CPU: the loss falls and the EMA model loads back."""
import json

import pytest
import torch

from ppo_ddpm.config import ConfigError, load_config
from ppo_ddpm.data import procedural_images, save_images
from ppo_ddpm.ddpm.model import load_model
from ppo_ddpm.pretrain import main, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny end-to-end runs (conftest.py)

TINY = [
    "device=cpu", "model.sample_size=8", "data.image_size=8", "model.base_channels=8",
    "model.channel_mults=[1,2]", "model.attention_resolutions=[4]", "data.procedural_count=32",
    "pretrain.batch_size=16", "pretrain.log_every=10",
]


def test_short_run_loss_falls_and_model_loads(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "pretrain.steps=60"])
    path = pretrain(cfg)
    assert path == tmp_path / "ddpm.pth"
    metrics = json.loads((tmp_path / "pretrain_metrics.json").read_text())
    assert metrics["steps"] == 60
    assert metrics["loss_last_10pct"] < 0.6 * metrics["loss_first_10pct"]
    assert len(list((tmp_path / "data" / "real").glob("*.png"))) == 32  # the procedural dataset
    model = load_model(path, cfg.model)
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([1, 999])).shape == x.shape


def test_cli_safetensors_on_a_class_folder(tmp_path):
    """main(--set ...) on an image folder with class sub-folders root/real/<c>/ writes .safetensors + .json."""
    for c in range(2):
        save_images(procedural_images(8, 8, seed=c), tmp_path / "data" / "real" / str(c), f"img{c}")
    out = tmp_path / "run"
    sets = TINY + [f"output_dir={out}", f"data.root={tmp_path / 'data'}", "model.num_classes=2",
                   "pretrain.steps=3", "pretrain.format=safetensors"]
    assert main([arg for kv in sets for arg in ("--set", kv)]) == 0
    path = out / "ddpm.safetensors"
    assert path.is_file() and (out / "ddpm.json").is_file()
    model = load_model(path)
    assert model.num_classes == 2


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "model.sample_size=16", "model.attention_resolutions=[]"])
    with pytest.raises(ConfigError, match="data.image_size = 8, model.sample_size = 16: data.image_size must equal"):
        pretrain(cfg)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "model.num_classes=3"])
    with pytest.raises(ConfigError, match="model.num_classes = 3.*class folders"):
        pretrain(cfg)  # the procedural dataset has no class folders
    assert main(["--set", "pretrain.stpes=3"]) == 2
    assert "unknown key 'pretrain.stpes'" in capsys.readouterr().err
