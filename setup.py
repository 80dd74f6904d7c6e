"""Builds the C++ extension ``ppo_ddpm._C`` (the rollout cache) with torch's cpp_extension.

- CPU torch (or no nvcc): ``CppExtension``.
- CUDA torch and nvcc present: ``CUDAExtension`` (CUDA_HOME / TORCH_CUDA_ARCH_LIST get defaults).
- ``PPO_DDPM_SKIP_EXT=1``: no extension; ``ppo_ddpm.rollout_cache`` falls back to pure Python.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("PPO_DDPM_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O2", "-g0", "-std=c++17"]
    nvcc = shutil.which("nvcc") or (
        os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    )
    use_cuda = torch.version.cuda is not None and nvcc and os.path.exists(nvcc)
    if use_cuda:
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "ppo_ddpm._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O2"]}
        )
    else:
        ext = cpp_extension.CppExtension("ppo_ddpm._C", sources, extra_compile_args={"cxx": cxx_flags})
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
