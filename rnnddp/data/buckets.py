"""Length-bucketed batches for variable-length sequences, in an order that no world size changes.

An epoch's global batches are a pure function of the sequence lengths, the global batch size,
the seed and the epoch: shuffle all sequences, cut the shuffle into pools of ``pool`` global
batches, sort each pool by length, cut it into global batches, shuffle the batches. So a global
batch holds sequences of similar length (little padding), batches of every length come in
random order, each sequence comes at most once per epoch (the ``N mod B`` left over after the
last full batch are skipped that epoch, as in DistributedSampler order), and global batch s is the
same on 1 or N ranks. Rank r takes every world_size-th sequence of each global batch, so the
ranks' shares come from the same bucket and have about equal lengths. A resume at step s of an
epoch skips the first s batches, on any number of ranks.
"""

from __future__ import annotations

import numpy as np

POOL = 50  # global batches per sorting pool: larger pads less, smaller keeps batches more random


def bucketed_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int, pool: int = POOL) -> np.ndarray:
    """The epoch's global batches as sequence indices, shape [len(lengths) // global_batch, global_batch]."""
    n = len(lengths)
    steps = n // global_batch
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)[: steps * global_batch]
    lengths = np.asarray(lengths)
    chunk = pool * global_batch
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        order[start : start + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batches = order.reshape(steps, global_batch)
    return batches[rng.permutation(steps)]


def rank_share(batches: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s part of each global batch: every world_size-th sequence, [steps, B / world_size]."""
    return batches[:, rank::world_size]


def pad_fraction(lengths: np.ndarray) -> float:
    """The share of padding when ``lengths`` are padded to their longest."""
    lengths = np.asarray(lengths)
    return 1.0 - float(lengths.sum()) / float(len(lengths) * lengths.max())
