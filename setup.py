"""Builds the C++ extension ``ppo_ddpm._C`` (the rollout cache) with torch's cpp_extension.

``csrc/`` is ATen only (no CUDA call, no .cu file: the same code handles CPU and CUDA tensors), so
the extension is always a ``CppExtension``, built by the host C++ compiler against the installed
torch, CPU or CUDA build alike; neither nvcc nor CUDA_HOME is needed.
``PPO_DDPM_SKIP_EXT=1``: no extension; ``ppo_ddpm.rollout_cache`` falls back to pure Python.
"""
import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("PPO_DDPM_SKIP_EXT", "0") == "1":
        return [], {}
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = cpp_extension.CppExtension("ppo_ddpm._C", sources, extra_compile_args={"cxx": ["-O2", "-g0", "-std=c++17"]})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
