"""Run checkpoints: SIGKILL mid-run then --resume equals an uninterrupted run step for step;
SIGINT / SIGTERM checkpoint and exit cleanly; a malicious pickle and a mismatched checkpoint are refused.

A tiny randomly initialised DDPM (saved with save_model) and the JPEG reward keep it fast.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ppo_ddpm.config import load_config
from ppo_ddpm.ddpm.model import build_model, save_model
from ppo_ddpm.finetune import main
from ppo_ddpm.utils.checkpoint import atomic_save, safe_load

ITERS = 12
# time, throughput and process memory differ between runs; everything else must be identical
NONDETERMINISTIC = ("time", "per_s", "memory")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tiny = ["model.sample_size=8", "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1]",
            "model.attention_resolutions=[]"]
    cfg = load_config(None, tiny)
    torch.manual_seed(0)
    save_model(build_model(cfg.model), d / "base.pth", cfg.model)
    sets = tiny + [
        f"model.pretrained={d / 'base.pth'}", "reward.kind=jpeg_compressibility", "device=cpu",
        "sampling.num_inference_steps=4", "ppo.batch_size=8", "ppo.microbatch=4", "ppo.num_minibatches=2",
        f"ppo.iterations={ITERS}", "ppo.lr=0.001", "logging.ckpt_every=1", "logging.sample_every=3",
        "eval.num_samples=4", "eval.batch_size=4",
    ]
    return d, sets


def _args(sets, out):
    return sum((["--set", s] for s in sets + [f"output_dir={out}"]), [])


def _metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(s in k for s in NONDETERMINISTIC)} for r in rows]


def _spawn(sets, out, *extra):
    # Triton's CPU interpreter (set by conftest) is only for the kernel tests: CPU tensors run the reference
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "ppo_ddpm.finetune", *_args(sets, out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_lines(out, n, proc, timeout=120):
    path = Path(out) / "metrics.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"no {n} metric lines within {timeout} s")


def _run(sets, out, *extra):
    proc = _spawn(sets, out, *extra)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, stderr


@pytest.fixture(scope="module")
def reference(setup):
    d, sets = setup
    out = d / "reference"
    _run(sets, out)
    return out


def test_sigkill_then_resume_matches_uninterrupted(setup, reference):
    d, sets = setup
    out = d / "killed"
    proc = _spawn(sets, out)
    _wait_for_lines(out, 3, proc)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted((out / "checkpoints").glob("*.pt"))
    assert ckpts, "no checkpoint written before the kill"
    for path in ckpts:  # none corrupt
        state = safe_load(path)
        assert 1 <= state["iteration"] < ITERS
    _, stderr = _run(sets, out, "--resume")
    assert "resumed from" in stderr + _
    expected = _metrics(reference)
    assert len(expected) == ITERS
    assert [r["iteration"] for r in _metrics(out)] == list(range(ITERS))
    assert _metrics(out) == expected
    final = safe_load(out / "checkpoints" / "last.pt")
    assert final["iteration"] == ITERS
    ref_state = safe_load(reference / "checkpoints" / "last.pt")["trainer"]["policy"]
    for k, v in final["trainer"]["policy"].items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0)
    assert (out / "eval" / "eval.json").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_exits_cleanly(setup, sig):
    d, sets = setup
    out = d / f"interrupted_{sig.name}"
    proc = _spawn(sets, out)
    _wait_for_lines(out, 2, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "--resume" in stderr and sig.name in stderr
    state = safe_load(out / "checkpoints" / "last.pt")
    done = len(_metrics(out))
    assert state["iteration"] == done < ITERS
    assert not (out / "finetuned.pth").exists()


def test_malicious_pickle_is_refused(setup, tmp_path, capsys):
    d, sets = setup
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ppo_ddpm.run/1", "trainer": Payload()}, evil)
    assert main(_args(sets, tmp_path / "run") + ["--resume", str(evil)]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "weights_only" in err
    assert not marker.exists()


def test_mismatched_checkpoint_is_a_clear_error(setup, reference, tmp_path, capsys):
    d, sets = setup
    ckpt = reference / "checkpoints" / "last.pt"
    # a config key that changes the run
    assert main(_args(sets + ["ppo.clip_range=0.1"], tmp_path / "a") + ["--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "ppo.clip_range" in err
    # matching config but weights of another architecture
    state = safe_load(ckpt)
    state["trainer"]["policy"]["conv_in.weight"] = torch.zeros(16, 3, 3, 3)
    state["config"]["output_dir"] = str(tmp_path / "b")
    bad = atomic_save(state, tmp_path / "bad.pt")
    assert main(_args(sets, tmp_path / "b") + ["--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "conv_in.weight" in err
    # written by another number of processes (the per-rank batch would change the global batch)
    state = safe_load(ckpt)
    state["world_size"] = 2
    state["config"]["output_dir"] = str(tmp_path / "d")
    other_world = atomic_save(state, tmp_path / "world2.pt")
    assert main(_args(sets, tmp_path / "d") + ["--resume", str(other_world)]) == 2
    err = capsys.readouterr().err
    assert str(other_world) in err and "2 process(es)" in err and "--nproc_per_node=2" in err
    # not a run checkpoint at all (a model file)
    assert main(_args(sets, tmp_path / "c") + ["--resume", str(d / "base.pth")]) == 2
    assert "missing key" in capsys.readouterr().err


def test_fresh_run_into_a_checkpointed_dir_is_refused(setup, reference, capsys):
    d, sets = setup
    assert main(_args(sets, reference)) == 2
    err = capsys.readouterr().err
    assert str(reference / "checkpoints" / "last.pt") in err and "--resume" in err
