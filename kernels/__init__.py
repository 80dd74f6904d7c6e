"""Fused Triton kernels, importable as ``ppo_ddpm.kernels``.

Each op lives in its own file with a plain-PyTorch reference, an autograd.Function and a
functional API that runs Triton on CUDA (or under ``TRITON_INTERPRET=1``) and the
reference on CPU.
"""
