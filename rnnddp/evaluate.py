"""No-grad evaluation of the unwrapped module on the whole test set (rank 0 alone; no collectives)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from rnnddp.data import Split, eval_batches


@torch.no_grad()
def evaluate(
    module: nn.Module,
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    normalize: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every sample of ``split`` (none dropped, none twice)."""
    was_training = module.training
    module.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in eval_batches(split, batch_size, device, normalize):
        with autocast or contextlib.nullcontext():
            logits = module(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
    module.train(was_training)
    return {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen, "samples": float(seen)}
