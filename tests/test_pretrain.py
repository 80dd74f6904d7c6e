"""A very short epsilon-prediction pretraining run on CPU: the loss falls and the EMA model loads back."""
import copy
import json

import pytest
import torch

from ppo_ddpm.config import ConfigError, load_config
from ppo_ddpm.data import procedural_images, save_images
from ppo_ddpm.ddpm.model import load_model
from ppo_ddpm.ddpm.unet import UNet
from ppo_ddpm.pretrain import ema_update, main, pretrain

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
    path = main([arg for kv in sets for arg in ("--set", kv)])
    assert path == out / "ddpm.safetensors" and (out / "ddpm.json").is_file()
    model = load_model(path)
    assert model.num_classes == 2


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "model.sample_size=16"])
    with pytest.raises(ConfigError, match="data.image_size=8 differs from model.sample_size=16"):
        pretrain(cfg)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "model.num_classes=3"])
    with pytest.raises(ValueError, match="model.num_classes=3"):
        pretrain(cfg)  # the procedural dataset has no class folders
    with pytest.raises(SystemExit, match="unknown key 'pretrain.stpes'"):
        main(["--set", "pretrain.stpes=3"])


def test_ema_update_formula():
    torch.manual_seed(0)
    model = UNet(sample_size=8, base_channels=8, channel_mults=[1], attention_resolutions=[])
    ema = copy.deepcopy(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema_update(ema, model, 0.9)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * model.state_dict()[k], atol=1e-6, rtol=1e-6)
