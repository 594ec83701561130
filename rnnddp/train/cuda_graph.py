"""``train.cuda_graph``: the whole training step recorded once as a CUDA graph and replayed for every batch.

A small LSTM's step on a GPU is bound by kernel launches, not arithmetic; replaying the recorded
kernels removes that cost (figures in docs/performance.md). Whether it applies is decided once,
when the job is built (``unsupported_reason``); the step is then wrapped (``GraphedStep``) and the
trainer calls it like any other step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rnnddp.train.step import TrainStep

log = logging.getLogger("rnnddp")


def unsupported_reason(
    device: torch.device, distributed: bool, task_reason: str | None, optim: Any, model: Any, nonfinite_from: int
) -> str | None:
    """Why the graph cannot hold this job's step, or None when it can."""
    if device.type != "cuda":
        return "it needs a CUDA device"
    if distributed:
        return "it is not supported with several ranks (DDP) yet"
    if task_reason:
        return task_reason
    if optim.name not in ("adam", "adamw"):
        return f"optim.name={optim.name} has no capturable fused step (use adam or adamw)"
    if model.num_layers > 1 and model.dropout > 0:
        return "cuDNN's dropout between LSTM layers keeps its own random state"
    if nonfinite_from:
        return "debug.nonfinite_from_step changes the step from one step to the next"
    return None


class GraphedStep:
    """A ``TrainStep`` replayed as one CUDA graph: forward, backward, unscale, clip, AdamW, scaler update.

    The first step runs eagerly (it creates the optimiser and scaler state the graph reads and
    writes in place); the second captures; every later one copies its batch into the graph's
    input buffers, writes this step's LR into the buffer the fused AdamW reads, and replays. The
    LR schedule stays a host-side float, so checkpoints look as without graphs. The optimiser
    must be built with ``capturable=True`` and the loss's autocast with ``cache=False``.
    """

    def __init__(self, step: TrainStep) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.graph is None and self._eager_steps == 0:
            self._eager_steps += 1
            return self.step(batch)
        if self.graph is None:
            self._capture(batch)
        for static, new in zip(self._static, batch, strict=True):
            static.copy_(new, non_blocking=True)
        for group, lr in zip(self.step.optimizer.param_groups, self._lr, strict=True):
            lr.fill_(group["lr"])
        self.graph.replay()
        return self._static_loss.clone()  # the next replay overwrites the graph's own

    def _capture(self, batch: tuple[torch.Tensor, ...]) -> None:
        step, optimizer = self.step, self.step.optimizer
        self._static = tuple(t.clone() for t in batch)
        device = self._static[0].device
        self._lr = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Lazy per-stream set-up (cuBLAS/cuDNN workspaces) happens here, not during capture.
            # Forward and backward only: the weights and optimiser state are not touched.
            for _ in range(2):
                step.scaler.scale(step.loss_fn(self._static)).backward()
                optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        floats = [g["lr"] for g in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self._lr, strict=True):
            group["lr"] = lr  # the captured AdamW reads the LR from this buffer at every replay
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self._static_loss = step(self._static)
        finally:
            for group, value in zip(optimizer.param_groups, floats, strict=True):
                group["lr"] = value
        log.info("train.cuda_graph: captured the training step for batches of %s", tuple(batch[0].shape))
