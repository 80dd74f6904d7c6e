"""scripts/gpu_check.sh on a machine without a GPU, in its quick mode: every stage is reported, the GPU
stages as skipped with their reason, the AOT stage runs, logs land in $OUT and the summary comes last."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GPU_STAGES = ("kernels", "cuda", "bench-kernels", "bench-memory", "bench-ppo", "bench-precision")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script itself is what runs (bash scripts/gpu_check.sh)")
def test_quick_run_on_cpu_skips_gpu_stages_with_reasons(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    stages = {row.split("\t")[0]: row.split("\t")[1:] for row in (tmp_path / "stages.tsv").read_text().splitlines()}
    assert list(stages) == ["install", *GPU_STAGES[:2], "aot", *GPU_STAGES[2:]]
    for name in GPU_STAGES:
        status, _, reason = stages[name]
        assert status == "SKIP" and "no CUDA device" in reason, (name, stages[name])
    assert stages["install"][0] == "SKIP" and "--quick" in stages["install"][2]
    assert stages["aot"][0] == "PASS" and (tmp_path / "aot.log").stat().st_size > 0 and (tmp_path / "aot.json").exists()
    summary = out.stdout[out.stdout.index("gpu_check summary"):]
    assert "device: no CUDA device" in summary and "sm_90:" in summary and "0 spills, all OK" in summary
    for name in stages:
        assert name in summary


def test_unknown_argument_is_refused():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--fast" in out.stderr
