"""The DDIM loop x_T -> x_0, written once: the PPO rollout, sampling, fake images and eval all run it.

    x_0 = ddim_loop(model, plan, x_T, labels, noise=lambda i: z_i)

Step i: o = model(x, t_i, y) (read as ``prediction_type``); (x_{i+1}, mu_i, log_prob_i) = step_fn(x, o,
abar_t[i], abar_prev[i], sigma[i], noise=noise(i), out=store(i + 1)); visit(i, x, x_{i+1}, mu_i, log_prob_i). No host syncs and
no data-dependent shapes (capturable in a CUDA graph when model, step_fn and the callbacks are).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .ddim import DDIMPlan, ddim_step_reference


def ddim_loop(
    model: nn.Module,
    plan: DDIMPlan,
    x_T: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    *,
    noise: Callable[[int], torch.Tensor],
    step_fn: Callable = ddim_step_reference,
    clip_x0: Optional[float] = None,
    sigma_floor: float = 0.0,
    prediction_type: str = "epsilon",
    store: Optional[Callable[[int], torch.Tensor]] = None,
    visit: Optional[Callable] = None,
) -> torch.Tensor:
    """Run x_T [B, C, H, W] through the plan's n steps -> x_0 (module docstring).

    ``noise(i)``: z_i [B, C, H, W]; ``store(i)``: the buffer that receives state i (e.g. the rollout
    cache's, any float dtype; the next step reads x back from it, so it continues from the stored value);
    ``visit(i, x_i, x_next, mu_i, log_prob_i)``: called after each step.
    """
    x = x_T
    B = x_T.shape[0]
    for i in range(plan.num_steps):
        t, *coefs = plan.step(i, B)
        eps = model(x, t, class_labels)
        x_next, mu, log_prob = step_fn(x, eps, *coefs, noise=noise(i), out=None if store is None else store(i + 1),
                                       clip_x0=clip_x0, sigma_floor=sigma_floor, prediction_type=prediction_type)
        if visit is not None:
            visit(i, x, x_next, mu, log_prob)
        x = x_next.to(x_T.dtype)
    return x


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    plan: DDIMPlan,
    x_T: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    step_fn: Callable = ddim_step_reference,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """x_0 of ``ddim_loop`` with z_i ~ N(0, I) drawn from ``generator`` (on x_T's device, in x_T's dtype),
    the model output read as ``prediction_type``, model in eval mode, no gradients."""
    plan = plan.to(x_T.device)
    was_training = model.training
    model.eval()
    draw = lambda i: torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)  # noqa: E731
    try:
        return ddim_loop(model, plan, x_T, class_labels, noise=draw, step_fn=step_fn, clip_x0=clip_x0,
                         prediction_type=prediction_type)
    finally:
        model.train(was_training)
