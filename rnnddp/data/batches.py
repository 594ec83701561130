"""In-memory splits, the validation hold-out, and per-rank batches in DistributedSampler order.

The training order comes from ``DistributedSampler`` (a function of seed and epoch only), and
rank r takes every world_size-th index of it. So global batch s is always
``order[s*B:(s+1)*B]`` whatever the world size: the same config optimises the same way on 1
or N ranks. An epoch has ``len(train) // B`` steps; the few samples past the last full
global batch are skipped that epoch and land elsewhere in the next shuffle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

from rnnddp.errors import UserError

Transform = Callable[[torch.Tensor], torch.Tensor]  # stored samples of a batch -> model input


@dataclass
class Split:
    inputs: torch.Tensor  # [N, ...]: uint8 images, or float sequences
    targets: torch.Tensor  # [N] labels, or [N, T, 1] per-step targets

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device) -> Split:
        return Split(self.inputs.to(device), self.targets.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.inputs[index], self.targets[index])


def hold_out(split: Split, size: int, seed: int) -> tuple[Split, Split]:
    """(rest, held out): ``size`` samples drawn by a generator seeded with ``seed`` alone.

    The same samples on every rank and at any world size; both parts keep the stored order.
    """
    if not 0 <= size < len(split):
        raise UserError(f"data.val_size={size} must be at least 0 and less than the {len(split)} training samples")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    held = order[:size].sort().values
    rest = order[size:].sort().values
    return split.subset(rest), split.subset(held)


def check_batch(global_batch_size: int, world_size: int, available: int, what: str) -> None:
    """One-line errors for a global batch the ranks cannot split evenly, or larger than the data."""
    if global_batch_size % world_size:
        raise UserError(
            f"train.global_batch_size={global_batch_size} is not divisible by the world size "
            f"{world_size}; pick a multiple of {world_size}"
        )
    if global_batch_size > available:
        raise UserError(f"train.global_batch_size={global_batch_size} is larger than {what} ({available})")


def rank_batches(sampler: DistributedSampler, epoch: int, batches: int, local_batch: int) -> torch.Tensor:
    """This rank's indices for ``epoch`` in the sampler's order, shape [batches, local_batch]."""
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.long)
    return idx[: batches * local_batch].view(batches, local_batch)


class TrainBatches:
    """Per-rank training batches in the DistributedSampler's order, by tensor indexing.

    ``transform`` turns the stored samples of a batch (on the batch's device) into the model's
    input: an image view, say.
    """

    def __init__(
        self,
        split: Split,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        transform: Transform | None = None,
    ) -> None:
        check_batch(global_batch_size, world_size, len(split), "the training set")
        self.split = split
        self.local_batch = global_batch_size // world_size
        self.steps_per_epoch = len(split) // global_batch_size
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.device = device
        self.transform = transform or (lambda x: x)
        self._pin = device.type == "cuda" and split.inputs.device.type == "cpu"

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for the epoch, shape [steps_per_epoch, local_batch]."""
        return rank_batches(self.sampler, epoch, self.steps_per_epoch, self.local_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the epoch from ``start_step`` on (resume skips what was consumed)."""
        idx = self.indices(epoch).to(self.split.inputs.device)
        for step in range(start_step, self.steps_per_epoch):
            i = idx[step]
            # index_select, not inputs[i]: several times faster on a CPU (docs/performance.md).
            inputs, targets = self.split.inputs.index_select(0, i), self.split.targets.index_select(0, i)
            if self._pin:
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            yield self.transform(inputs), targets


def eval_batches(
    split: Split, batch_size: int, device: torch.device, transform: Transform | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in order, every sample exactly once (the last batch may be short)."""
    for start in range(0, len(split), batch_size):
        inputs = split.inputs[start : start + batch_size].to(device, non_blocking=True)
        targets = split.targets[start : start + batch_size].to(device, non_blocking=True)
        yield (transform(inputs) if transform else inputs), targets
