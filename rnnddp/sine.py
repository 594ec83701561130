"""The sine task: learn cos(t) from sin(t), one prediction per step, chunk by chunk.

Each sequence is sin(phi + k*dt) -> cos(phi + k*dt) for k < ``data.sine_length``, with a random
phase phi and the seed program's 10 steps per pi. One optimiser step trains on one chunk of
``data.chunk_len`` steps of a batch of sequences; the hidden state is carried to the next
chunk of the same sequences and detached there (truncated BPTT), and starts from zeros at
each new batch. Sequences are sharded over ranks by the same DistributedSampler rule as the
images (rank r holds positions r, r+W, ... of every global batch), which is what lets a
checkpoint taken mid-sequence resume on another world size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from rnnddp.data import Split, check_batch, rank_batches

DT = math.pi / 10  # the seed program's spacing: 10 steps per pi
TEST_SEED = 1_000_003  # held-out phases do not depend on cfg.seed: one test set for every run


def make_split(num: int, length: int, seed: int) -> Split:
    """``num`` sequences: inputs sin and targets cos, each float [num, length, 1]."""
    phase = torch.rand(num, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    t = phase + DT * torch.arange(length, dtype=torch.float64)
    return Split(torch.sin(t).float().unsqueeze(-1), torch.cos(t).float().unsqueeze(-1))


def make_splits(data_cfg: Any, seed: int) -> tuple[Split, Split]:
    """Training sequences from the job's seed, and the fixed held-out set."""
    train = make_split(data_cfg.sine_sequences, data_cfg.sine_length, seed)
    test = make_split(data_cfg.sine_test_sequences, data_cfg.sine_length, TEST_SEED)
    return train, test


class ChunkBatches:
    """Per-rank chunks of sequence batches: step s is chunk s % C of global batch s // C.

    Yields ``(x, y, new_sequence)``: ``new_sequence`` tells the trainer to start the hidden
    state from zeros (the first chunk of a batch).
    """

    def __init__(
        self,
        split: Split,
        *,
        global_batch_size: int,
        chunk_len: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ) -> None:
        check_batch(global_batch_size, world_size, len(split), "data.sine_sequences")
        self.split = split.to(device)  # kilobytes: always resident
        self.local_batch = global_batch_size // world_size
        self.batches_per_epoch = len(split) // global_batch_size
        self.chunk_len = chunk_len
        self.chunks = split.images.shape[1] // chunk_len
        self.steps_per_epoch = self.batches_per_epoch * self.chunks
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sequence indices for the epoch, shape [batches_per_epoch, local_batch]."""
        return rank_batches(self.sampler, epoch, self.batches_per_epoch, self.local_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        idx = self.indices(epoch).to(self.split.images.device)
        held = -1  # the batch whose sequences x, y hold (gathered once, sliced per chunk)
        for step in range(start_step, self.steps_per_epoch):
            batch, chunk = divmod(step, self.chunks)
            if batch != held:
                held = batch
                x, y = self.split.images.index_select(0, idx[batch]), self.split.labels.index_select(0, idx[batch])
            t = slice(chunk * self.chunk_len, (chunk + 1) * self.chunk_len)
            yield x[:, t], y[:, t], chunk == 0


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply ``fn`` to a hidden state: None, a tensor, or an LSTM's (h, c) pair."""
    if state is None:
        return None
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def detach_state(state: Any) -> Any:
    """Cut the graph behind a carried hidden state, kept in fp32.

    fp32 whatever autocast produced (bf16, or fp16 from cuDNN): the cast back under autocast is
    exact, and a checkpoint taken mid-sequence then resumes under any precision.
    """
    return map_state(lambda s: s.detach().float(), state)


def merge_states(per_rank: list[Any]) -> Any:
    """Every rank's carried state -> the global batch's, in global order (rank r held r, r+W, ...)."""
    if per_rank[0] is None:
        return None
    if isinstance(per_rank[0], tuple):
        return tuple(merge_states([s[k] for s in per_rank]) for k in range(len(per_rank[0])))
    stacked = torch.stack(per_rank, dim=2)  # [layers, b, W, H]: local j of rank r is global j*W + r
    return stacked.flatten(1, 2)


def rank_state(state: Any, rank: int, world_size: int, device: torch.device) -> Any:
    """This rank's slice of a global carried state (the inverse of ``merge_states``)."""
    return map_state(lambda s: s[:, rank::world_size].contiguous().to(device), state)


@torch.no_grad()
def evaluate_sine(
    module: nn.Module,
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    predictions: bool = False,
) -> dict[str, Any]:
    """MSE over every step of every held-out sequence, each run from a zero state to its end.

    A whole sequence in one call is the same computation as its chunks with the state carried.
    ``loss`` and ``mse`` are the same number (the trainer logs a loss for every task).
    """
    was_training = module.training
    module.eval()
    sq_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds: list[torch.Tensor] = []
    for start in range(0, len(split), batch_size):
        x = split.images[start : start + batch_size].to(device)
        y = split.labels[start : start + batch_size].to(device)
        with autocast or contextlib.nullcontext():
            out, _ = module(x)
        sq_sum += F.mse_loss(out.float(), y, reduction="sum").double()
        if predictions:
            preds.append(out.float().cpu())
    module.train(was_training)
    mse = sq_sum.item() / split.labels.numel()
    result: dict[str, Any] = {"loss": mse, "mse": mse, "samples": float(len(split))}
    if predictions:
        result["predictions"] = torch.cat(preds)
    return result
