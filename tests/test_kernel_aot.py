"""Every Triton launch of the fused ops compiles for sm_90 and sm_80 without a GPU (``kernels.aot``):
0 spill bytes, shared memory within the per-block limit, every kernel of the kernel modules reached."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppo_ddpm.config import load_config
from ppo_ddpm.kernels import _dispatch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton is not installed")


def launched_kernels() -> set[str]:
    """module.name of every @triton.jit function named *_kernel in the kernel modules (the ones launched
    from Python; the other jit functions are device helpers they call)."""
    code = (
        "import importlib\nfrom triton.runtime.jit import JITFunction\n"
        "for m in ('ddim_step', 'gaussian_log_ratio', 'ppo_trajectory'):\n"
        "    mod = importlib.import_module('ppo_ddpm.kernels.' + m)\n"
        "    for n, v in vars(mod).items():\n"
        "        if isinstance(v, JITFunction) and n.endswith('_kernel'): print(m + '.' + n)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.fixture(scope="module")
def aot_summary(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, compiled
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-m", "ppo_ddpm.kernels.aot", "--json", str(path)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=REPO)
    assert out.returncode == 0, f"AOT check failed (rc {out.returncode}):\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    return json.loads(path.read_text()), out.stdout


def test_every_launch_compiles_without_spills_for_sm90_and_sm80(aot_summary):
    summary, stdout = aot_summary
    assert summary["ok"] and summary["num_sms"] == 132
    kernels = summary["kernels"]
    assert {k["arch"] for k in kernels} == {90, 80}
    for k in kernels:
        assert k["problem"] == "" and k["spill_bytes"] == 0 and k["registers"] > 0, k
    specs = {arch: sorted((k["kernel"], k["signature"]) for k in kernels if k["arch"] == arch) for arch in (90, 80)}
    assert specs[90] == specs[80]  # the same launches, specialised alike, for both targets
    assert "regs" in stdout and "sm_90" in stdout and "sm_80" in stdout  # the printed table


def test_sweep_covers_prediction_types_grad_masks_and_out_buffers(aot_summary):
    """Every PRED of ddim_step (forward and backward), both STRICT values of the trajectory kernel, and sampling
    into out= buffers of the other state dtype (pointers: x_t, eps, noise, x_prev, mean, ...)."""
    summary, _ = aot_summary
    sigs: dict = {}
    for k in summary["kernels"]:
        if k["arch"] == 90:
            sigs.setdefault(k["kernel"], []).append(k["signature"])
    for kernel in ("ddim_step._forward_kernel", "ddim_step._backward_kernel"):
        for pred in range(3):
            assert any(f" PRED={pred}" in s for s in sigs[kernel]), (kernel, pred)
    for strict in (True, False):
        assert any(f" STRICT={strict}" in s for s in sigs["ppo_trajectory._trajectory_kernel"]), strict
    forward = sigs["ddim_step._forward_kernel"]
    for pointers in ("*fp32,fp32,fp32,bf16,fp32,", "*bf16,bf16,bf16,fp32,bf16,", "*bf16,bf16,fp32,fp32,bf16,"):
        assert any(s.startswith(pointers) and "SCORE=False" in s for s in forward), pointers


def test_discovery_reaches_every_kernel(aot_summary):
    summary, _ = aot_summary
    assert {k["kernel"] for k in summary["kernels"]} == launched_kernels()


def test_sweep_covers_the_config_image_sizes():
    from ppo_ddpm.kernels.aot import SHAPES

    for cfg in sorted((REPO / "configs").glob("*.yaml")):
        m = load_config(cfg).model
        assert (m.in_channels, m.sample_size, m.sample_size) in SHAPES, f"{cfg.name}: add its image size to kernels.aot.SHAPES"
