"""sine_regression: learn cos(t) from sin(t), one prediction per step, chunk by chunk.

Each sequence is sin(phi + k*dt) -> cos(phi + k*dt) for k < ``sine.length``, with a random
phase phi and the seed program's 10 steps per pi. One optimiser step trains on one chunk of
``sine.chunk_len`` steps of a batch of sequences; the hidden state is carried to the next
chunk of the same sequences and detached there (truncated BPTT), and starts from zeros at
each new batch. Sequences are sharded over ranks by the same DistributedSampler rule as the
images (rank r holds positions r, r+W, ... of every global batch), which is what lets a
checkpoint taken mid-sequence resume on another world size. Validation and test sequences are
two fixed sets of their own, whatever the seed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from rnnddp import plots
from rnnddp.data.batches import Split, check_batch, rank_batches
from rnnddp.errors import UserError
from rnnddp.export.graphs import Tensor
from rnnddp.metrics import Metric
from rnnddp.models import regressor_args
from rnnddp.tasks.base import Picture, Serving, Splits, Task
from rnnddp.train.carry import CarriedState, interleaved_rows

DT = math.pi / 10  # the seed program's spacing: 10 steps per pi
VAL_SEED = 1_000_033  # validation phases: one fixed set, apart from the test set's
TEST_SEED = 1_000_003  # held-out phases do not depend on cfg.seed: one test set for every run


@dataclass
class SineConfig:
    sequences: int = 2048  # training sequences (sharded over ranks by the sampler)
    val_sequences: int = 256  # validation sequences (model selection; a fixed set, whatever the seed)
    test_sequences: int = 256  # test sequences (evaluated once, at the end; a fixed set)
    length: int = 200  # steps per sequence: a multiple of chunk_len
    chunk_len: int = 10  # steps per optimiser step; the hidden state carries over (truncated BPTT)


def make_split(num: int, length: int, seed: int) -> Split:
    """``num`` sequences: inputs sin and targets cos, each float [num, length, 1]."""
    phase = torch.rand(num, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    t = phase + DT * torch.arange(length, dtype=torch.float64)
    return Split(torch.sin(t).float().unsqueeze(-1), torch.cos(t).float().unsqueeze(-1))


def make_splits(sine: SineConfig, seed: int) -> Splits:
    """Training sequences from the job's seed, and the fixed validation and test sets."""
    return Splits(
        make_split(sine.sequences, sine.length, seed),
        make_split(sine.val_sequences, sine.length, VAL_SEED),
        make_split(sine.test_sequences, sine.length, TEST_SEED),
    )


class ChunkBatches:
    """Per-rank chunks of sequence batches: step s is chunk s % C of global batch s // C.

    Yields ``(x, y, new_sequence)``: ``new_sequence`` tells the loss to start the hidden
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
        check_batch(global_batch_size, world_size, len(split), "sine.sequences")
        self.split = split.to(device)  # kilobytes: always resident
        self.local_batch = global_batch_size // world_size
        self.batches_per_epoch = len(split) // global_batch_size
        self.chunk_len = chunk_len
        self.chunks = split.inputs.shape[1] // chunk_len
        self.steps_per_epoch = self.batches_per_epoch * self.chunks
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sequence indices for the epoch, shape [batches_per_epoch, local_batch]."""
        return rank_batches(self.sampler, epoch, self.batches_per_epoch, self.local_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        idx = self.indices(epoch).to(self.split.inputs.device)
        held = -1  # the batch whose sequences x, y hold (gathered once, sliced per chunk)
        for step in range(start_step, self.steps_per_epoch):
            batch, chunk = divmod(step, self.chunks)
            if batch != held:
                held = batch
                x, y = self.split.inputs.index_select(0, idx[batch]), self.split.targets.index_select(0, idx[batch])
            t = slice(chunk * self.chunk_len, (chunk + 1) * self.chunk_len)
            yield x[:, t], y[:, t], chunk == 0


def sine_prediction(
    inputs: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor, out: Path, n: int = 3
) -> Path:
    """The first ``n`` test sequences: input sin, target cos and the prediction, step by step."""
    plt = plots.pyplot()
    n = min(n, len(targets))
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.2 * n), squeeze=False, sharex=True)
    for k, ax in enumerate(axes[:, 0]):
        t = range(targets.shape[1])
        ax.plot(t, inputs[k, :, 0].cpu(), color="0.7", lw=1, label="input sin(t)")
        ax.plot(t, targets[k, :, 0].cpu(), "r-", lw=1.5, label="target cos(t)")
        ax.plot(t, predictions[k, :, 0].cpu(), "b--", lw=1.5, label="prediction")
        mse = torch.mean((predictions[k] - targets[k].cpu()) ** 2).item()
        ax.set_title(f"test sequence {k}: MSE {mse:.5f}", fontsize=9)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step (the hidden state carries across chunks)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class SineRegression(Task):
    name = "sine_regression"
    section = "sine"
    Section = SineConfig
    metric = Metric("mse", higher_is_better=False, log_scale=True)
    cuda_graph_unsupported = "the sine task's carried hidden state changes the model's call from chunk to chunk"
    choices: dict[str, tuple[str, ...]] = {}
    # Every sine.* key stays on resume: the sequences are generated from them and the seed, a
    # checkpoint taken mid-sequence carries a state for exactly that batch and chunk position, and
    # best.pt compares validation results.

    @classmethod
    def validate(cls, cfg: Any) -> None:
        s = cfg.sine
        for key in ("sequences", "val_sequences", "test_sequences", "length", "chunk_len"):
            if getattr(s, key) <= 0:
                raise UserError(f"bad value for config key 'sine.{key}': must be > 0")
        if s.length % s.chunk_len:
            raise UserError(f"sine.length={s.length} is not a multiple of sine.chunk_len={s.chunk_len}; make it one")
        if cfg.model.name != "rnn" or cfg.model.bidirectional:
            raise UserError(
                "task=sine_regression needs a causal recurrent model: model.name=rnn, model.bidirectional=false"
            )

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        # The state carried into the next chunk; rank r holds sequences r, r+W, ... of each global batch.
        self.carried = CarriedState(info, cfg.train.global_batch_size, interleaved_rows)

    def model_args(self) -> dict:
        return regressor_args(self.cfg.model)

    def load(self) -> Splits:
        return make_splits(self.cfg.sine, self.cfg.seed)  # generated: every rank makes the same sequences

    def train_batches(self, split: Split) -> ChunkBatches:
        return ChunkBatches(
            split,
            global_batch_size=self.cfg.train.global_batch_size,
            chunk_len=self.cfg.sine.chunk_len,
            rank=self.info.rank,
            world_size=self.info.world_size,
            seed=self.cfg.seed,
            device=self.info.device,
        )

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        x, y, new_sequence = batch
        with autocast:
            out, state = model(x, None if new_sequence else self.carried.state)
        self.carried.keep(state)  # truncated BPTT: detached, no gradient into earlier chunks
        return F.mse_loss(out.float(), y)

    @torch.no_grad()
    def evaluate(
        self, module: nn.Module, split: Split, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """MSE over every step of every sequence, each run from a zero state to its end.

        A whole sequence in one call is the same computation as its chunks with the state carried.
        ``loss`` and ``mse`` are the same number (the trainer logs a loss for every task).
        """
        device = self.info.device
        was_training = module.training
        module.eval()
        sq_sum = torch.zeros((), device=device, dtype=torch.float64)
        preds: list[torch.Tensor] = []
        size = self.cfg.eval.batch_size
        for start in range(0, len(split), size):
            x = split.inputs[start : start + size].to(device)
            y = split.targets[start : start + size].to(device)
            with autocast:
                out, _ = module(x)
            sq_sum += F.mse_loss(out.float(), y, reduction="sum").double()
            if detail:
                preds.append(out.float().cpu())
        module.train(was_training)
        mse = sq_sum.item() / split.targets.numel()
        result: dict[str, Any] = {"loss": mse, "mse": mse, "samples": len(split)}
        if detail:
            result["predictions"] = torch.cat(preds)
        return result

    def state_dict(self) -> dict[str, Any]:
        return self.carried.state_dict()  # mid-sequence: the whole global batch's state, in its order

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried.load_state_dict(state)

    def pictures(self, result: dict[str, Any], split: Split) -> dict[str, Picture]:
        preds = result["predictions"]
        return {"sine_prediction": lambda out: sine_prediction(split.inputs, split.targets, preds, out)}

    def describe(self) -> str:
        m = self.cfg.model
        return f"{m.cell}-{m.hidden_size}x{m.num_layers}, task sine_regression"

    def report(self, result: dict[str, Any], split: Split) -> list[str]:
        steps = split.targets.shape[1]
        return [f"test mse {result['mse']:.6f}  ({result['samples']} test sequences of {steps} steps)"]

    def serving(self) -> Serving:
        x = Tensor("x", "float32", ["batch", "time", 1], "sin(t) at each step; the state carries from chunk to chunk")
        return Serving(nn.Identity(), x, lengths=False, meta={"output": "cos(t) at each step"})
