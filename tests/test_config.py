"""The typed config loader: unknown keys, wrong types, --set overrides, Optional / Literal / list."""
import argparse

import pytest

from ppo_ddpm.config import Config, ConfigError, add_config_args, config_from_args, load_config


def _write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_embedded_default_loads():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.channel_mults == [1, 2] and cfg.sampling.clip_x0 == 1.0 and cfg.ppo.objective == "trajectory"


def test_file_values_override_defaults_and_keep_the_rest(tmp_path):
    p = _write(tmp_path, "seed: 7\nppo:\n  clip_range: 0.1\n  per_step_clip: null\nmodel:\n  channel_mults: [1, 2, 4]\n")
    cfg = load_config(p)
    assert cfg.seed == 7 and cfg.ppo.clip_range == 0.1 and cfg.ppo.per_step_clip is None
    assert cfg.model.channel_mults == [1, 2, 4]
    assert cfg.ppo.global_clip == Config().ppo.global_clip  # untouched default


@pytest.mark.parametrize(
    "text, key",
    [
        ("ppo:\n  clip_rnage: 0.1\n", "ppo.clip_rnage"),
        ("bogus: 1\n", "bogus"),
        ("model:\n  sample_size: 16\n  extra: 3\n", "model.extra"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    p = _write(tmp_path, text, "bad_unknown.yaml")
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(p)
    assert f"'{key}'" in str(e.value) and "bad_unknown.yaml" in str(e.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("ppo:\n  clip_range: fast\n", "ppo.clip_range"),  # str for float
        ("ppo:\n  clip_range: true\n", "ppo.clip_range"),  # bool is not a float
        ("seed: 1.5\n", "seed"),  # float for int
        ("model:\n  num_classes: '3'\n", "model.num_classes"),  # str for int
        ("ppo:\n  cuda_graphs: 1\n", "ppo.cuda_graphs"),  # int for bool
        ("output_dir: 3\n", "output_dir"),  # int for str
        ("model:\n  channel_mults: 2\n", "model.channel_mults"),  # not a list
        ("model:\n  channel_mults: [1, two]\n", "model.channel_mults[1]"),  # bad element
        ("schedule:\n  kind: quadratic\n", "schedule.kind"),  # Literal
        ("sampling:\n  clip_x0: big\n", "sampling.clip_x0"),  # Optional[float]
        ("model: 3\n", "model"),  # section not a mapping
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    p = _write(tmp_path, text, "bad_type.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"'{key}'" in str(e.value) and "bad_type.yaml" in str(e.value)


def test_literal_error_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"\['linear', 'scaled_linear', 'cosine'\]"):
        load_config(_write(tmp_path, "schedule:\n  kind: quadratic\n"))


def test_optional_float_accepts_null_and_widens_int(tmp_path):
    assert load_config(_write(tmp_path, "sampling:\n  clip_x0: null\n")).sampling.clip_x0 is None
    cfg = load_config(_write(tmp_path, "sampling:\n  clip_x0: 2\n  eta: 0\n"))
    assert cfg.sampling.clip_x0 == 2.0 and isinstance(cfg.sampling.clip_x0, float)
    assert isinstance(cfg.sampling.eta, float)


def test_set_overrides_parse_yaml_scalars(tmp_path):
    p = _write(tmp_path, "ppo:\n  clip_range: 0.3\n")
    cfg = load_config(p, ["ppo.clip_range=0.1", "sampling.clip_x0=null", "model.channel_mults=[1,2,2]",
                          "sampling.spacing=trailing", "ppo.cuda_graphs=false", "output_dir=/tmp/x", "data.root="])
    assert cfg.ppo.clip_range == 0.1 and cfg.sampling.clip_x0 is None
    assert cfg.model.channel_mults == [1, 2, 2] and cfg.sampling.spacing == "trailing"
    assert cfg.ppo.cuda_graphs is False and cfg.output_dir == "/tmp/x" and cfg.data.root == ""


@pytest.mark.parametrize(
    "override, match",
    [
        ("ppo.clip_rnage=0.1", "'ppo.clip_rnage'"),
        ("ppo.clip_range=abc", "'ppo.clip_range'"),
        ("ppo.clip_range", "expected key=value"),
        ("seed.x=1", "'seed'"),  # seed is not a section
    ],
)
def test_bad_override_names_key(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [override])
    assert "--set" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_argparse_cfg_and_set(tmp_path):
    p = _write(tmp_path, "seed: 3\n")
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--cfg", str(p), "--set", "ppo.lr=0.5", "--set", "seed=4"])
    cfg = config_from_args(args)
    assert cfg.seed == 4 and cfg.ppo.lr == 0.5
    assert config_from_args(parser.parse_args([])) == Config()


@pytest.mark.parametrize("text, value", [("3e-5", 3e-5), ("1e-4", 1e-4), ("1E+3", 1e3), ("-2e-2", -2e-2),
                                         ("1.0e5", 1e5), ("2.5e-3", 2.5e-3), ("7", 7.0)])
def test_floats_without_a_dot_read_as_floats(tmp_path, text, value):
    """README's own example: --set ppo.lr=3e-5 (YAML 1.1 would read '3e-5' as a string)."""
    for cfg in (load_config(None, [f"ppo.lr={text}"]), load_config(_write(tmp_path, f"ppo:\n  lr: {text}\n"))):
        assert isinstance(cfg.ppo.lr, float) and cfg.ppo.lr == value


@pytest.mark.parametrize("text", ["1e", "e5", "1e5x", "1.2.3"])
def test_near_floats_stay_strings(text):
    with pytest.raises(ConfigError, match=f"'ppo.lr' expects a float, got '{text}'"):
        load_config(None, [f"ppo.lr={text}"])


def test_validation_of_some_sections_only():
    """A trainer built from a Config in code (no file) checks its own sections: other sections may be anything."""
    from ppo_ddpm.config import validate_config

    cfg = Config()
    cfg.model.in_channels = 1  # not RGB: a CLI run refuses it, the trainer alone does not care
    assert validate_config(cfg, sections=("ppo", "sampling", "schedule")) is cfg
    cfg.ppo.train_last_k = 10  # 10 DDIM steps, the last deterministic (set_alpha_to_one): 9 policy steps
    with pytest.raises(ConfigError, match="ppo.train_last_k = 10, sampling.num_inference_steps = 10.*must be <= 9"):
        validate_config(cfg, sections=("ppo", "sampling", "schedule"))
    cfg.ppo.sample_at_floor = True  # every sigma raised to ppo.sigma_floor > 0: all 10 steps are the policy's
    assert validate_config(cfg, sections=("ppo", "sampling", "schedule")) is cfg
    with pytest.raises(ConfigError, match="model.in_channels = 1"):
        validate_config(cfg)
