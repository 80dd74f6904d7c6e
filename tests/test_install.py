"""The editable install: ``ppo_ddpm.kernels`` resolves to the top-level ``kernels/`` folder, the C++
extension is built (unless PPO_DDPM_SKIP_EXT=1 asked for the pure-Python fallback) and imports on its
own, and ``set_seed`` makes python, numpy and torch repeat."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppo_ddpm.kernels
from ppo_ddpm.rollout_cache import HAS_EXTENSION
from ppo_ddpm.utils import set_seed

REPO = Path(__file__).resolve().parents[1]
SKIP_EXT = os.environ.get("PPO_DDPM_SKIP_EXT", "0") == "1"


def test_kernels_package_maps_to_top_level_folder():
    assert Path(ppo_ddpm.kernels.__file__).resolve().parent == REPO / "kernels"


@pytest.mark.skipif(SKIP_EXT, reason="PPO_DDPM_SKIP_EXT=1: the pure-Python rollout cache is in use")
def test_extension_is_built_and_imports_on_its_own():
    assert HAS_EXTENSION, "ppo_ddpm._C did not import; rebuild with pip install --no-build-isolation -e ."
    code = "import ppo_ddpm._C as C; print(C.RolloutCache.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RolloutCache"


def test_set_seed_repeats_python_numpy_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    set_seed(123)
    a = draw()
    set_seed(123)
    assert draw() == a
    set_seed(124)
    assert draw() != a
