"""configs/smoke.yaml spells out the embedded default exactly; configs/default.yaml is the GPU run."""
from pathlib import Path

import yaml

from ppo_ddpm.config import Config, config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_smoke_yaml_is_the_embedded_default_with_every_key():
    raw = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    assert set(_flat(raw)) == set(_flat(config_to_dict(Config())))  # every key written out
    assert load_config(CONFIGS / "smoke.yaml") == Config() == load_config(None)


def test_default_yaml_is_gpu_sized():
    cfg = load_config(CONFIGS / "default.yaml")
    diff = {k for k, v in _flat(config_to_dict(cfg)).items() if _flat(config_to_dict(Config()))[k] != v}
    expected = {
        "model.sample_size", "data.image_size", "model.base_channels", "model.channel_mults",
        "model.num_res_blocks", "model.attention_resolutions", "sampling.num_inference_steps",
        "ppo.batch_size", "ppo.state_dtype",
    }
    assert expected <= diff
    assert cfg.model.sample_size == cfg.data.image_size == 32
    assert cfg.model.base_channels == 128 and cfg.model.channel_mults == [1, 2, 2, 2]
    assert cfg.model.num_res_blocks == 2 and cfg.model.attention_resolutions == [16]
    assert cfg.sampling.num_inference_steps == 50 and cfg.ppo.batch_size == 64
    assert cfg.ppo.state_dtype == "bfloat16" and cfg.ppo.cuda_graphs is True
    assert cfg.device == "auto"
