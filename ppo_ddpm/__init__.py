"""ppo_ddpm: PPO fine-tuning of DDPMs sampled with DDIM.

The DDPM is the policy; one DDIM reverse process x_T..x_0 is one episode; a frozen reward
scores x_0. See README.md for the objective and the engine (Triton kernels in
``ppo_ddpm.kernels``, the C++ rollout cache in ``ppo_ddpm._C``).
"""
__version__ = "0.1.0"

# torch first: the C++ extension ppo_ddpm._C links against torch's libraries and type bindings.
import torch  # noqa: E402,F401
