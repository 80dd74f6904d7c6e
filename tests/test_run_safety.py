"""Runs that survive moves, interruptions, corruption, a full disk, a second process and divergence.

Everything goes through the CLIs' ``main(argv)`` in-process on a tiny embedded pipeline (8x8
images, a few steps per stage); each test asserts the exit code and the message.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from ppo_ddpm import finetune, pretrain
from ppo_ddpm.ddpm.model import load_model
from ppo_ddpm.utils.checkpoint import DiskFullError, _atomic_write, atomic_save, atomic_write_text, safe_load
from ppo_ddpm.utils.lock import RunLock

TINY = ["device=cpu", "model.sample_size=8", "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1]",
        "model.attention_resolutions=[]", "data.procedural_count=16", "pretrain.steps=6", "pretrain.batch_size=8",
        "pretrain.log_every=2", "pretrain.ckpt_every=2", "reward.train_steps=3", "reward.num_fake=8",
        "reward.batch_size=8", "reward.hidden_channels=4", "sampling.num_inference_steps=3", "ppo.batch_size=4",
        "ppo.microbatch=4", "ppo.use_kernels=false", "logging.ckpt_every=1", "logging.sample_every=0",
        "logging.tensorboard=false", "eval.num_samples=4", "eval.batch_size=4"]


def args(*sets: str) -> list[str]:
    return [a for s in (*TINY, *sets) for a in ("--set", s)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny end-to-end runs (conftest.py)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, one_thread):
    """A finished two-iteration run (checkpoints after iterations 1 and 2), made with a relative
    output_dir from its parent folder; tests work on copies."""
    parent = tmp_path_factory.mktemp("done")
    cwd = os.getcwd()
    os.chdir(parent)
    try:
        assert finetune.main(args("output_dir=run", "ppo.iterations=2")) == 0
    finally:
        os.chdir(cwd)
    return parent / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# --------------------------------------------------------------------------- moves and resume checks


def test_moved_run_resumes_without_redoing_anything(done_run, tmp_path, monkeypatch, capsys):
    record = json.loads((done_run / "pipeline.json").read_text())
    assert {v["path"] for v in record.values()} == {"data", "ddpm.pth", "reward_model.safetensors"}
    made = ["ddpm.pth", "reward_model.safetensors", *(f"data/fake/{p.name}" for p in (done_run / "data/fake").glob("*.png"))]
    before = {name: digest(done_run / name) for name in made}
    shutil.copytree(done_run, tmp_path / "moved")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    # resumed from elsewhere, with another micro-batch size (memory only: allowed to change)
    assert finetune.main(args("output_dir=../moved", "ppo.iterations=3", "ppo.microbatch=2") + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 3 and "running" not in out
    assert "resumed from ../moved/checkpoints/last.pt at iteration 2" in out
    assert {name: digest(tmp_path / "moved" / name) for name in made} == before
    assert [r["iteration"] for r in metrics(tmp_path / "moved")] == [0, 1, 2]
    assert safe_load(tmp_path / "moved/checkpoints/last.pt")["iteration"] == 3


def test_resume_checks_come_before_any_stage(done_run, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert finetune.main(args(f"output_dir={fresh}") + ["--resume", str(tmp_path / "nope.pt")]) == 2
    assert f"checkpoint not found: {tmp_path / 'nope.pt'}" in capsys.readouterr().err
    assert finetune.main(args(f"output_dir={fresh}") + ["--resume"]) == 2
    assert f"nothing to resume in {fresh}" in capsys.readouterr().err
    # a checkpoint of another config: refused before the data / pretrain / reward stages run
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(done_run / "checkpoints/last.pt", fresh / "checkpoints/last.pt")
    assert finetune.main(args(f"output_dir={fresh}", "ppo.clip_range=0.1") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "config key 'ppo.clip_range' is 0.2 in the checkpoint but 0.1 in this run" in err
    assert sorted(p.name for p in fresh.iterdir()) == [".lock", "checkpoints"]


def test_fresh_run_never_overwrites_an_earlier_one(done_run, tmp_path, capsys):
    assert finetune.main(args(f"output_dir={done_run}", "ppo.iterations=2")) == 2
    err = capsys.readouterr().err
    assert str(done_run / "checkpoints/last.pt") in err and str(done_run / "metrics.jsonl") in err
    assert "--resume" in err and "--overwrite" in err
    # a model file the pipeline did not record (a standalone pretrain): refused before the data stage
    other = tmp_path / "other"
    other.mkdir()
    (other / "ddpm.pth").write_bytes(b"a model of someone else")
    assert finetune.main(args(f"output_dir={other}")) == 2
    assert f"{other / 'ddpm.pth'} already exists" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == [".lock", "ddpm.pth"]
    # a recorded stage whose config changed is not silently reused
    run = copy_of(done_run, tmp_path)
    for name in ("checkpoints/last.pt", "checkpoints/prev.pt", "metrics.jsonl", "finetuned.pth"):
        (run / name).unlink()
    assert finetune.main(args(f"output_dir={run}", "pretrain.steps=7")) == 2
    assert "stage 'pretrain'" in (err := capsys.readouterr().err) and "pretrain.steps: 6 -> 7" in err


def test_pretrain_cli_refuses_then_overwrites_with_the_flag(tmp_path, capsys):
    out = tmp_path / "pre"
    assert pretrain.main(args(f"output_dir={out}", "pretrain.steps=2")) == 0
    assert pretrain.main(args(f"output_dir={out}", "pretrain.steps=2")) == 2
    err = capsys.readouterr().err
    assert f"{out / 'ddpm.pth'}, {out / 'checkpoints/pretrain/last.pt'} already exist" in err and "--overwrite" in err
    assert pretrain.main(args(f"output_dir={out}", "pretrain.steps=2") + ["--overwrite"]) == 0


# --------------------------------------------------------------------------- checkpoint files


def test_corrupt_last_falls_back_to_prev_and_stale_temp_files_go(done_run, tmp_path, capsys):
    run = copy_of(done_run, tmp_path)
    ckpt = run / "checkpoints"
    last, prev = ckpt / "last.pt", ckpt / "prev.pt"
    assert os.stat(last).st_ino != os.stat(prev).st_ino and os.stat(prev).st_nlink == 1  # a real copy
    assert safe_load(prev)["iteration"] == 1
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn
    stale = ckpt / ".last.pt.0badc0de.tmp"
    stale.write_bytes(b"half of a checkpoint")
    assert finetune.main(args(f"output_dir={run}", "ppo.iterations=2") + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{last} cannot be loaded" in captured.err and f"falling back to {prev}" in captured.err
    assert f"resumed from {prev} at iteration 1" in captured.out
    assert f"removed {stale}" in captured.err and not stale.exists()
    assert safe_load(last)["iteration"] == 2 and safe_load(prev)["iteration"] == 1
    assert os.stat(last).st_ino != os.stat(prev).st_ino and os.stat(prev).st_nlink == 1
    # both unreadable: the error names both files
    for p in (last, prev):
        p.write_bytes(b"garbage")
    assert finetune.main(args(f"output_dir={run}", "ppo.iterations=2") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and f"the fallback {prev} fails too" in err


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        a = atomic_save({"x": torch.zeros(2)}, tmp_path / "a.pt")
        b = atomic_write_text("hi", tmp_path / "b.txt")
    finally:
        os.umask(old)
    assert (a.stat().st_mode & 0o777) == (b.stat().st_mode & 0o777) == 0o666 & ~mask


def test_disk_full_is_a_named_error_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError, match=f"no space left on the device writing {target}"):
        _atomic_write(target, full)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    assert pretrain.main(args(f"output_dir={tmp_path / 'run'}", "pretrain.steps=2")) == 2
    err = capsys.readouterr().err
    assert "error: no space left on the device writing" in err and "Traceback" not in err


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):  # another live holder (flock is per open file, so this process counts as one)
        assert pretrain.main(args(f"output_dir={out}", "pretrain.steps=2")) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by pid {os.getpid()}" in err
    assert not (out / "ddpm.pth").exists()
    (out / ".lock").write_text("pid 4242 on elsewhere (pretrain)")  # left by a killed run: no flock held
    assert pretrain.main(args(f"output_dir={out}", "pretrain.steps=2")) == 0
    assert "took over the stale lock" in (err := capsys.readouterr().err) and "pid 4242" in err


def raising_reward(x0):
    raise ValueError("bad pixel")


def test_an_error_inside_a_plugin_reward_stops_the_run_naming_it(done_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune.main(args(f"output_dir={out}", f"model.pretrained={done_run / 'ddpm.pth'}", "reward.kind=plugin",
                              f"reward.function={__name__}:raising_reward")) == 2
    err = capsys.readouterr().err
    assert f"error: reward.function='{__name__}:raising_reward' raised ValueError: bad pixel (at {__file__}:" in err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- divergence


def test_diverged_policy_stops_the_run_and_keeps_good_checkpoints(done_run, tmp_path, capsys):
    run = copy_of(done_run, tmp_path)
    for name in ("checkpoints/last.pt", "checkpoints/prev.pt", "metrics.jsonl", "finetuned.pth"):
        (run / name).unlink()
    # one update per iteration: the first iteration ends (checkpointed) before the samples turn NaN
    assert finetune.main(args(f"output_dir={run}", "ppo.iterations=6", "ppo.lr=1e30", "ppo.num_epochs=1",
                              "ppo.num_minibatches=1")) == 2
    err = capsys.readouterr().err
    assert "the policy diverged" in err and "no checkpoint was written for it" in err and "Lower ppo.lr" in err
    assert "Traceback" not in err
    rows = metrics(run)  # strict JSON, and nothing logged for the diverged iteration
    done = safe_load(run / "checkpoints/last.pt")
    assert done["iteration"] == len(rows) < 6
    for name, v in done["trainer"]["policy"].items():
        assert torch.isfinite(v).all(), name
    assert not (run / "finetuned.pth").exists()


def test_diverged_pretraining_stops_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(args(f"output_dir={out}", "pretrain.lr=1e6")) == 2
    err = capsys.readouterr().err
    assert "pretraining diverged by step 2" in err and "non-finite" in err and "Lower pretrain.lr" in err
    assert not (out / "checkpoints").exists() and not (out / "ddpm.pth").exists()


# --------------------------------------------------------------------------- Ctrl-C


def sigint_at_step(monkeypatch, k: int) -> None:
    """Send this process SIGINT during pretraining step ``k`` (1-based), as Ctrl-C would."""
    calls = {"n": 0}
    real = pretrain.ema_update_

    def ema_then_sigint(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(pretrain, "ema_update_", ema_then_sigint)


def test_pretrain_ctrl_c_checkpoints_and_resumes_step_for_step(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    assert pretrain.main(args(f"output_dir={ref}")) == 0
    out = tmp_path / "run"
    sigint_at_step(monkeypatch, 3)
    assert pretrain.main(args(f"output_dir={out}")) == 0
    err = capsys.readouterr().err
    assert "SIGINT: finishing this step" in err and "stopped after step 3/6" in err and "Traceback" not in err
    assert "resume with: python -m ppo_ddpm.pretrain" in err and err.rstrip().endswith("--resume")
    assert safe_load(out / "checkpoints/pretrain/last.pt")["step"] == 3 and not (out / "ddpm.pth").exists()
    monkeypatch.undo()
    assert pretrain.main(args(f"output_dir={out}") + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = load_model(ref / "ddpm.pth").state_dict(), load_model(out / "ddpm.pth").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / "pretrain_metrics.json").read_text())["loss_last_10pct"] == \
        json.loads((ref / "pretrain_metrics.json").read_text())["loss_last_10pct"]


def test_ctrl_c_in_the_pipeline_pretrain_stage_resumes_there(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    sigint_at_step(monkeypatch, 2)
    assert finetune.main(args(f"output_dir={out}", "ppo.iterations=1")) == 0
    err = capsys.readouterr().err
    assert "stopped after step 2/6" in err and "resume with: python -m ppo_ddpm.finetune" in err
    assert "pretrain" not in json.loads((out / "pipeline.json").read_text())
    monkeypatch.undo()
    assert finetune.main(args(f"output_dir={out}", "ppo.iterations=1") + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "no PPO checkpoint" in captured.out and "[pretrain] resumed from" in captured.err
    assert safe_load(out / "checkpoints/last.pt")["iteration"] == 1


def test_ctrl_c_in_reward_training_and_eval_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    from ppo_ddpm import eval as eval_cli
    from ppo_ddpm import train_reward_model
    from ppo_ddpm.data import procedural_images, save_images

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    save_images(procedural_images(4, 8, seed=0), tmp_path / "data/real", "r")
    save_images(procedural_images(4, 8, seed=1), tmp_path / "data/fake", "f")
    monkeypatch.setattr(train_reward_model, "fit_reward_cnn", interrupted)
    out = tmp_path / "run"
    assert train_reward_model.main(args(f"output_dir={out}", f"data.root={tmp_path / 'data'}")) == 130
    err = capsys.readouterr().err
    assert "[train_reward_model] interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert not (out / "reward_model.safetensors").exists()

    monkeypatch.setattr(eval_cli, "evaluate", interrupted)
    model = tmp_path / "data/real/r_00000.png"  # any existing file: evaluate is interrupted first
    assert eval_cli.main(args(f"output_dir={out}", "reward.kind=jpeg_compressibility") +
                         ["--base", str(model), "--finetuned", str(model)]) == 130
    err = capsys.readouterr().err
    assert "[eval] interrupted (Ctrl-C)" in err and "Traceback" not in err
