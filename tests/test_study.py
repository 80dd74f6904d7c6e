"""python -m ppo_ddpm.study: a finished study run again reuses its bases and runs (nothing retrained), and
values that are not finite (None) read n/a in the table instead of crashing it."""
import json

import pytest

from ppo_ddpm.study import _ratio, main, table

pytestmark = pytest.mark.slow

TINY = ["model.sample_size=8", "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1]",
        "model.attention_resolutions=[]", "sampling.num_inference_steps=3", "data.procedural_count=16",
        "pretrain.steps=4", "pretrain.batch_size=4", "reward.train_steps=4", "reward.batch_size=8", "reward.num_fake=16",
        "ppo.iterations=1", "ppo.batch_size=4", "ppo.microbatch=4", "ppo.group_buffer_size=4", "ppo.group_min_count=2",
        "eval.num_samples=4", "eval.batch_size=4"]


def test_a_study_run_again_reuses_everything(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--out", str(out), "--seeds", "0", "--variants", "default", "--rewards", "model", "--jobs", "1"]
    argv += [a for s in TINY for a in ("--set", s)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "[pipeline] pretrain: running" in first
    rows = json.loads((out / "results.json").read_text())
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("finetuned.pth")}
    assert len(rows) == 1 and len(finished) == 2  # the run on the reward and its random-reward control

    assert main(argv) == 0  # the same command on the finished study: reuse, never refuse
    second = capsys.readouterr().out
    assert "[pipeline] pretrain: done earlier" in second and "[pipeline] reward: done earlier" in second
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("finetuned.pth")} == finished  # not retrained
    again = json.loads((out / "results.json").read_text())
    assert again[0]["gain"] == rows[0]["gain"]  # the same evaluation
    assert again[0]["wall_s"] == rows[0]["wall_s"] > 0  # nothing trained: the first training's wall time is kept


def test_unknown_values_read_n_a():
    row = {"reward": "model", "variant": "default", "seed": 0, "gain": None, "gain_se": None, "control_gain": 0.1,
           "gain_over_control": None, "gain_over_control_se": None, "win_rate": None, "keep_frac": None,
           "clipfrac": 0.5, "top_step_share": None, "diversity_ratio": _ratio(None, 3.0), "kid_base": 0.1,
           "kid_finetuned": None, "grain_base": 0.2, "grain_finetuned": None, "grain_real": None,
           "verdict": "non-finite", "wall_s": None}
    line = table([row]).splitlines()[2]
    assert "| n/a ± n/a | +0.100 |" in line and "| non-finite |" in line
    assert _ratio(2.0, 4.0) == 0.5 and _ratio(1.0, 0.0) is None


def test_signal_shares_and_the_floor_moves_weight_off_the_nearly_noiseless_step(tmp_path):
    """--signal: per-step shares of sum_t ||g_t||^2 over the stochastic steps sum to 1 (the deterministic last step
    has none); raising the scoring floor from 0.01 to 0.5 scales the sigma = 0.01 step's gradient by (0.01/0.5)^2,
    so its share falls."""
    from ppo_ddpm.study import VARIANTS, _signal

    VARIANTS["floor 0.5"] = ["ppo.sigma_floor=0.5"]
    try:
        import argparse

        args = argparse.Namespace(cfg=None, seeds=[0], rewards=["model"], variants=["no warm-up, sigma_floor 0.01", "floor 0.5"],
                                  overrides=TINY + ["sampling.num_inference_steps=4"], signal_batches=2)
        rows = _signal(args, tmp_path)
    finally:
        del VARIANTS["floor 0.5"]
    low, high = rows
    assert len(low["step_share"]) == 3 and low["timesteps"] == [750, 500, 250]  # t = 0 -> x_0 is deterministic
    for r in rows:
        assert sum(r["step_share"]) == pytest.approx(1.0) and -1.0 <= r["cosine"] <= 1.0
    assert high["step_share"][-1] < low["step_share"][-1]


def test_rows_of_a_second_invocation_are_merged(tmp_path):
    from ppo_ddpm.study import _merge

    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"reward": "model", "variant": "default", "seed": 0, "gain": 1.0, "wall_s": 9.0},
                                {"reward": "model", "variant": "default", "seed": 1, "gain": 2.0, "wall_s": 8.0}]))
    rows = _merge(path, [{"reward": "jpeg_compressibility", "variant": "default", "seed": 0, "gain": 4.0},
                         {"reward": "model", "variant": "mine", "seed": 0, "gain": 5.0},
                         {"reward": "model", "variant": "trajectory-mean", "seed": 0, "gain": 6.0},
                         {"reward": "model", "variant": "default", "seed": 1, "gain": 3.0, "wall_s": None}])
    # by reward and variant in the order the study lists them (a variant it does not list last), then seed
    assert [(r["reward"], r["variant"], r["seed"], r["gain"]) for r in rows] == [
        ("model", "default", 0, 1.0), ("model", "default", 1, 3.0), ("model", "trajectory-mean", 0, 6.0),
        ("model", "mine", 0, 5.0), ("jpeg_compressibility", "default", 0, 4.0)]
    assert rows[1]["wall_s"] == 8.0  # only re-evaluated: the wall time of its training is kept


def test_a_reward_the_config_cannot_serve_fails_before_any_run(tmp_path, capsys):
    """The classifier reward needs class folders: on the embedded default the study stops with the key
    named, before it pretrains anything."""
    out = tmp_path / "study"
    assert main(["--rewards", "classifier", "--variants", "default", "--seeds", "0", "--out", str(out)]) == 2
    assert "reward.kind = 'classifier'" in capsys.readouterr().err
    assert not (out / "base_seed0").exists()
