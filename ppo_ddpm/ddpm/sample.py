"""Sampling x_0 from a DDPM model with a DDIM plan (no gradients; eval, fake images for the reward)."""
from __future__ import annotations

import torch
from torch import nn

from .ddim import DDIMPlan, ddim_step_reference


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    plan: DDIMPlan,
    x_T: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Run x_T [B, C, H, W] through the plan's n DDIM steps -> x_0 [B, C, H, W] (model in eval mode).

    Step i: o = model(x, t_i), x <- ddim_step_reference(x, o, abar_t[i], abar_prev[i], sigma[i]) with o read
    as ``prediction_type``,
    with z ~ N(0, I) drawn from ``generator`` (on x_T's device).
    """
    plan = plan.to(x_T.device)
    was_training = model.training
    model.eval()
    try:
        x = x_T
        for i in range(plan.num_steps):
            t, *coefs = plan.step(i, x.shape[0])
            x, _, _ = ddim_step_reference(x, model(x, t, class_labels), *coefs, clip_x0=clip_x0, generator=generator,
                                          prediction_type=prediction_type)
    finally:
        model.train(was_training)
    return x
