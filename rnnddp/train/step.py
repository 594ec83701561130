"""One optimiser step of any task: the task's loss of a batch, backward, unscale, clip, step, scaler update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[Any], torch.Tensor]  # a batch -> the scalar loss, under autocast where wanted


class TrainStep:
    """``step(batch) -> loss`` with no host sync, so a CUDA graph can hold it (see cuda_graph.py)."""

    def __init__(
        self,
        loss_fn: LossFn,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        grad_clip: float = 0.0,
    ) -> None:
        self.loss_fn = loss_fn
        self.module = module  # unwrapped: its parameters are clipped
        self.optimizer = optimizer
        self.scaler = scaler
        self.grad_clip = grad_clip

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(self, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(batch)
        scale = getattr(batch, "lr_scale", 1.0)  # a step that trains on more or fewer tokens (variable BPTT)
        if scale != 1.0:
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * scale
            self.update(loss)
            for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
        else:
            self.update(loss)
        return loss.detach()
