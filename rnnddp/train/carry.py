"""The hidden state carried from one optimiser step to the next (truncated backpropagation through time).

One mechanism for every task that carries state (across the chunks of a batch of sequences, or the
steps through stripes of one token stream): each rank holds the state of the rows it owns, detached after every step so no gradient reaches an
earlier step; a checkpoint holds the whole global batch's state in global row order, so a resume on
any number of ranks slices out the rows each rank owns then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rnnddp import dist
from rnnddp.dist import DistInfo

State = Any  # None, a tensor [layers, rows, hidden], an LSTM's (h, c) pair, or a list of those (one per layer)


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """Apply ``fn`` to every tensor of a hidden state."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, s) for s in state)
    return fn(state)


def detach_state(state: State) -> State:
    """Cut the graph behind a carried hidden state, kept in fp32.

    fp32 whatever autocast produced (bf16, or fp16 from cuDNN): the cast back under autocast is
    exact, and a checkpoint taken mid-stream then resumes under any precision.
    """
    return map_state(lambda s: s.detach().float(), state)


def interleaved_rows(rank: int, world_size: int, global_rows: int) -> torch.Tensor:
    """Rows r, r+W, r+2W, ... (DistributedSampler's rule, as batches of sequences are sharded)."""
    return torch.arange(rank, global_rows, world_size)


def block_rows(rank: int, world_size: int, global_rows: int) -> torch.Tensor:
    """One contiguous block of rows per rank (stripes of one stream: each rank reads one region of it)."""
    per = global_rows // world_size
    return torch.arange(rank * per, (rank + 1) * per)


def merge_states(per_rank: list[State], rows: list[torch.Tensor], global_rows: int) -> State:
    """Every rank's state (rank r's local row j is global row ``rows[r][j]``) -> the global batch's."""
    first = per_rank[0]
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(merge_states([s[k] for s in per_rank], rows, global_rows) for k in range(len(first)))
    merged = first.new_zeros(first.shape[0], global_rows, *first.shape[2:])
    for state, owned in zip(per_rank, rows, strict=True):
        merged[:, owned] = state
    return merged


def slice_state(state: State, owned: torch.Tensor, device: torch.device) -> State:
    """This rank's rows of a global state (the inverse of ``merge_states``)."""
    return map_state(lambda s: s[:, owned].contiguous().to(device), state)


class CarriedState:
    """The state of the rows this rank owns, carried from step to step and into checkpoints.

    ``rows(rank, world_size, global_rows)`` says which global rows a rank owns; the checkpoint entry
    ``key`` holds the global state (None: every row starts from zeros).
    """

    def __init__(
        self,
        info: DistInfo,
        global_rows: int,
        rows: Callable[[int, int, int], torch.Tensor] = interleaved_rows,
        key: str = "carry",
    ) -> None:
        self.info, self.global_rows, self.rows, self.key = info, global_rows, rows, key
        self.owned = rows(info.rank, info.world_size, global_rows)
        self.state: State = None

    def keep(self, state: State) -> None:
        """Carry ``state`` (a model's returned state) into the next step, detached."""
        self.state = detach_state(state)

    def reset(self) -> None:
        self.state = None

    def state_dict(self) -> dict[str, Any]:
        """The global state in global row order (every rank calls it: it gathers)."""
        per_rank = dist.gather_objects(map_state(torch.Tensor.cpu, self.state), self.info)
        w = len(per_rank)
        owned = [self.rows(r, w, self.global_rows) for r in range(w)]
        return {self.key: merge_states(per_rank, owned, self.global_rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's rows of a checkpoint's global state, whatever world size wrote it."""
        self.state = slice_state(state.get(self.key), self.owned, self.info.device)
