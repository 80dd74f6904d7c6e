"""CUDA graphs for the two no-grad loops (rollout, ratio pass) and the with-grad micro-batch step.

``GraphedCall(fn)`` runs ``fn()`` a few times on a side stream (warm-up: cuDNN/cuBLAS
autotuning and Triton compilation happen outside the capture), captures one call into a
``torch.cuda.CUDAGraph``, and replays it on ``__call__``. ``fn`` must read its inputs from and
write its outputs to static tensors (the trainer's noise buffers, the RolloutCache, a rows
index buffer, a log-ratio buffer); the caller fills the inputs before each replay.

RNG choice: the rollout's own ``torch.Generator`` is registered with the graph
(``CUDAGraph.register_generator_state``), so the step noise z_i is drawn *inside* the graph, in
place into one [B, C, H, W] buffer, with Philox offsets that continue from the generator's state
at replay time. Before each replay the trainer reseeds that generator and draws x_T and the labels
eagerly into their static buffers; the replayed steps then draw exactly the numbers the eager loop
draws for the same seed (same generator, same order, same offsets). No [n, B, C, H, W] noise
tensor is ever held.

Parameters are read in place by the graph, so optimizer steps (in-place updates) are seen by
later replays; a graph must be recaptured only if a buffer is reallocated.

With-grad step (``grads=``): ``fn`` runs a micro-batch forward and ``loss.backward()``. Before the
capture every trained parameter holds a static ``.grad`` tensor (allocated once by the trainer), so
autograd's AccumulateGrad adds in place (``grad += new``) and the captured backward accumulates into
those tensors on every replay, as the eager loop accumulates over steps and micro-batches. The warm-up
calls accumulate too: the grads are saved before and restored after them. The caller zeroes the static
grads in place before each minibatch and gives them back to the parameters (an optimizer's
``zero_grad(set_to_none=True)`` only drops the references; the trainer keeps them alive).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class GraphedCall:
    """Capture ``fn()`` once on the current CUDA device; calling the object replays it.

    ``generator``: a non-default CUDA generator that ``fn`` draws from, registered with the graph.
    ``grads``: the static ``.grad`` tensors a backward inside ``fn`` accumulates into (module docstring);
    then warm-up and capture run with autograd on, and the grads keep their values across them.
    """

    def __init__(self, fn: Callable[[], Any], warmup: int = 2, generator: Optional[torch.Generator] = None,
                 grads: Optional[list[torch.Tensor]] = None):
        if generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError("this torch build cannot draw from a custom generator inside a CUDA graph "
                               "(CUDAGraph.register_generator_state is missing); set ppo.cuda_graphs: false")
        autograd = torch.enable_grad if grads is not None else torch.no_grad
        saved = [g.clone() for g in grads] if grads is not None else []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autograd():
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph), autograd():
            self.output = fn()
        for g, value in zip(grads or [], saved):
            g.copy_(value)  # undo the warm-up's accumulation

    def __call__(self) -> Any:
        self.graph.replay()
        return self.output
