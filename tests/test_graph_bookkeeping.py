"""The trainer's CUDA-graph paths on the CPU, with a stand-in for ``graphs.GraphedCall`` that keeps its
contract (warm-up calls, grads restored after them, one static output object overwritten by every
"replay") but re-runs ``fn`` instead of replaying a captured graph. What this checks is the trainer's
side of the graphs: static input buffers refilled before every replay, one graph per micro-batch size,
static .grad tensors zeroed and handed back per minibatch, outputs read before the next replay, the
generator restarted after the rollout's capture. A whole update equals the eager trainer's, bit for bit.
The capture itself (kernels recorded, backward accumulating in place) needs a GPU: tests/test_cuda_graphs.py."""
from __future__ import annotations

import copy

import pytest
import torch

from ppo_ddpm.ppo import PPOTrainer
from ppo_ddpm.ppo import trainer as trainer_module
from test_trainer_grad import TinyEps, brightness, tiny_config


def _overwrite(static, new):
    """Copy ``new`` into the tensors of ``static`` (same structure), as a graph replay overwrites its outputs."""
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, dict):
        for k in static:
            _overwrite(static[k], new[k])
    elif isinstance(static, (tuple, list)):
        for a, b in zip(static, new):
            _overwrite(a, b)


class ReplayStandIn:
    """GraphedCall's contract without CUDA (module docstring)."""

    instances: list = []

    def __init__(self, fn, warmup: int = 2, generator=None, grads=None):
        autograd = torch.enable_grad if grads is not None else torch.no_grad
        saved = [g.clone() for g in grads or []]
        with autograd():
            for _ in range(warmup):
                fn()
        for g, value in zip(grads or [], saved):
            g.copy_(value)
        self.fn, self.autograd, self.output, self.grads = fn, autograd, None, grads
        ReplayStandIn.instances.append(self)

    def __call__(self):
        with self.autograd():
            out = self.fn()
        if self.output is None:
            self.output = out
        else:
            _overwrite(self.output, out)
        return self.output


@pytest.mark.parametrize("objective", ["trajectory", "per_step"])
def test_graphed_update_equals_eager_on_cpu(monkeypatch, objective):
    monkeypatch.setattr(trainer_module, "GraphedCall", ReplayStandIn)
    ReplayStandIn.instances = []
    cfg = tiny_config(objective=objective, kl_beta=0.1, num_epochs=2, num_minibatches=2, lr=1e-3)  # chunks of 3 and 1
    torch.manual_seed(0)
    policy = TinyEps().double()
    run = {}
    for graphs in (False, True):
        trainer = PPOTrainer(copy.deepcopy(cfg), copy.deepcopy(policy), brightness, "cpu")
        trainer.use_graphs = graphs  # the CUDA path's bookkeeping, on the CPU
        history = []
        for it in range(2):  # the second iteration replays every graph with new rollouts
            stats = trainer.step(it)
            history.append({k: v for k, v in stats.items() if not k.startswith(("time_", "samples_per_s", "peak_"))})
        run[graphs] = (trainer, history)
    (eager, h_eager), (graphed, h_graphed) = run[False], run[True]
    assert h_graphed == h_eager
    assert torch.equal(graphed.cache.states, eager.cache.states)
    for pg, pe in zip(graphed.policy.parameters(), eager.policy.parameters()):
        assert torch.equal(pg, pe)
    keys = sorted(k for k in graphed._graphs if isinstance(k, tuple))
    assert keys == [("grad", 1, 4), ("grad", 3, 4)] + ([("ratio", 4)] if objective == "trajectory" else [])
    assert graphed._grads is not None and all(q.grad is None for q in graphed.params)  # zero_grad(set_to_none) after the step
    assert sum(s.grads is not None for s in ReplayStandIn.instances) == 2  # one with-grad graph per micro-batch size
