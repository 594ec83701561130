"""One long token stream as striped truncated-BPTT batches (the language model's training data).

The stream is cut into ``G = train.global_batch_size`` contiguous stripes of ``L`` tokens each
(pytorch/examples' ``batchify``): stripe ``g`` is tokens ``[o + g*L, o + (g+1)*L)`` for the epoch's
offset ``o``. Global step ``s`` of an epoch takes the next ``seq_len`` tokens of every stripe as
inputs and the tokens one further on as targets; the stripes' hidden states carry from step to
step. Rank ``r`` of ``W`` owns stripes ``[r*G/W, (r+1)*G/W)``, one contiguous region of the stream
that it alone reads, so the global batch, and hence the model, is the same on any number of ranks.

Every epoch's plan (its offset and each step's length) comes from the seed and the epoch alone:
a resume, on any number of ranks, finds the same position. Options (AWD-LSTM's):
``random_offset`` starts the stripes ``o`` tokens into the stream, ``o`` drawn in ``[0, bptt)`` for
each epoch, so the stripes' cut points move; ``variable_bptt`` draws each step's length (``bptt``
with probability 0.95, else ``bptt / 2``, then normal with sd 5, at least 5), and the step's
learning rate is scaled by ``seq_len / bptt`` (``lr_scale``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from rnnddp.errors import UserError
from rnnddp.train.carry import block_rows


class StreamBatch(NamedTuple):
    inputs: torch.Tensor  # int64 [local stripes, seq_len]
    targets: torch.Tensor  # int64 [local stripes, seq_len]: the next token of each input
    new_epoch: bool  # the first step of an epoch: the stripes start from a zero state
    lr_scale: float  # seq_len / bptt under variable_bptt, else 1.0


def stripe_length(tokens: int, stripes: int, bptt: int, random_offset: bool) -> int:
    """Tokens per stripe (an offset of up to ``bptt - 1`` tokens must still fit)."""
    return (tokens - (bptt - 1 if random_offset else 0)) // stripes


class StreamBatches:
    """This rank's stripes of one token stream, step by step (see the module's docstring)."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        global_batch_size: int,
        bptt: int,
        rank: int,
        world_size: int,
        seed: int,
        variable_bptt: bool = False,
        random_offset: bool = False,
        device: torch.device | None = None,
        name: str = "lm.path's train split",
    ) -> None:
        if global_batch_size % world_size:
            raise UserError(
                f"train.global_batch_size={global_batch_size} (stripes) is not divisible by the world size "
                f"{world_size}; make it a multiple of {world_size}"
            )
        self.tokens, self.stripes, self.bptt, self.seed = tokens, global_batch_size, bptt, seed
        self.variable_bptt, self.random_offset = variable_bptt, random_offset
        self.device = device or torch.device("cpu")
        self.length = stripe_length(len(tokens), global_batch_size, bptt, random_offset)
        if self.length < bptt + 1:
            need = global_batch_size * (bptt + 1) + (bptt - 1 if random_offset else 0)
            raise UserError(
                f"{name} holds {len(tokens)} tokens, fewer than train.global_batch_size x (lm.bptt + 1) = "
                f"{need}; lower train.global_batch_size or lm.bptt, or give more text"
            )
        self.owned = block_rows(rank, world_size, global_batch_size)
        self.steps_per_epoch = (self.length - 1) // bptt
        self._tokens = 0  # tokens of the global batch trained since the last window_metrics

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, 0x57])

    def plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """The epoch's offset and each step's length (sum at most ``length - 1``), from seed and epoch."""
        rng = self._rng(epoch)
        offset = int(rng.integers(self.bptt)) if self.random_offset else 0
        n = self.steps_per_epoch
        if not self.variable_bptt:
            return offset, np.full(n, self.bptt, dtype=np.int64)
        base = np.where(rng.random(n) < 0.95, self.bptt, self.bptt / 2)
        drawn = np.maximum(5, rng.normal(base, 5).astype(np.int64))
        lengths = np.empty(n, dtype=np.int64)
        left = self.length - 1
        for k in range(n):  # every later step keeps at least one token
            lengths[k] = max(1, min(int(drawn[k]), left - (n - 1 - k)))
            left -= lengths[k]
        return offset, lengths

    def region(self, offset: int) -> np.ndarray:
        """This rank's stripes as rows of a view of the stream: [local stripes, length]."""
        first, count = int(self.owned[0]), len(self.owned)
        start = offset + first * self.length
        return self.tokens[start : start + count * self.length].reshape(count, self.length)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[StreamBatch]:
        offset, lengths = self.plan(epoch)
        rows = self.region(offset)
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # this rank's region on the GPU once per epoch (int32: 4 bytes a token), not a copy per step
            rows = torch.from_numpy(np.asarray(rows, dtype=np.int32)).to(self.device)
        positions = np.concatenate([[0], np.cumsum(lengths)])
        for step in range(start_step, self.steps_per_epoch):
            pos, n = int(positions[step]), int(lengths[step])
            if on_gpu:
                chunk = rows[:, pos : pos + n + 1].long()
            else:
                chunk = torch.from_numpy(np.asarray(rows[:, pos : pos + n + 1], dtype=np.int64))
            self._tokens += n * self.stripes
            yield StreamBatch(chunk[:, :-1], chunk[:, 1:], step == 0, n / self.bptt)

    def window_metrics(self, elapsed: float) -> dict[str, float]:
        """``train/tokens_per_s``: the global batch's tokens per second of training since the last call."""
        tokens, self._tokens = self._tokens, 0
        return {"train/tokens_per_s": tokens / max(elapsed, 1e-9)}


class TextTokens:
    """Tokens held in memory (a text file given to ``rnnddp-evaluate --text``), shaped like a prepared split."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def to(self, device: torch.device) -> TextTokens:
        return self


def eval_chunks(tokens: np.ndarray, stripes: int, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A whole stream for evaluation: ``stripes`` rows of ``L`` tokens, ``bptt`` steps at a time, the
    state carried by the caller. Every token but the first of each stripe and the tail beyond
    ``stripes * L`` is predicted once."""
    length = len(tokens) // stripes
    rows = tokens[: stripes * length].reshape(stripes, length)
    for pos in range(0, length - 1, bptt):
        chunk = torch.from_numpy(np.asarray(rows[:, pos : pos + bptt + 1], dtype=np.int64))
        yield chunk[:, :-1], chunk[:, 1:]
