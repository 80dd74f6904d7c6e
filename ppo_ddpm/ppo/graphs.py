"""CUDA graphs for the two no-grad loops (rollout, ratio pass).

``GraphedCall(fn)`` runs ``fn()`` a few times on a side stream (warm-up: cuDNN/cuBLAS
autotuning and Triton compilation happen outside the capture), captures one call into a
``torch.cuda.CUDAGraph``, and replays it on ``__call__``. ``fn`` must read its inputs from and
write its outputs to static tensors (the trainer's noise buffers, the RolloutCache, a rows
index buffer, a log-ratio buffer); the caller fills the inputs before each replay.

RNG choice: nothing is drawn inside the graph. The rollout's x_T, step noise z and class labels
are drawn before replay, in place into the static buffers, from a ``torch.Generator`` seeded by the
rollout seed (``RolloutNoise.fill_``); the graph only reads them. The eager path reads the very
same buffers, so graph and eager results agree for the same seed, and explicit noise
(``rollout(seed, noise=...)``) works identically on both paths.

Parameters are read in place by the graph, so optimizer steps (in-place updates) are seen by
later replays; a graph must be recaptured only if a buffer is reallocated.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class GraphedCall:
    """Capture ``fn()`` once on the current CUDA device; calling the object replays it."""

    def __init__(self, fn: Callable[[], Any], warmup: int = 2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output = fn()

    def __call__(self) -> Any:
        self.graph.replay()
        return self.output
