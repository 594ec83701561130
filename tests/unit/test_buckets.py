"""The length-bucketed order: world-size free, each sequence once per epoch, little padding, exact resume.

Checked through the job's own per-rank batches (``SequenceBatches``, as the sequence tasks build them)
over an in-memory split whose every step holds its sequence's index, so a padded batch tells which
sequences it holds (row r is sequence ``x[r, 0, 0]``).
"""

from __future__ import annotations

import numpy as np
import torch

from rnnddp.data.buckets import bucketed_batches, rank_share
from rnnddp.data.sequences import SequenceBatches, SplitArrays, pack

CPU = torch.device("cpu")


def _lengths(n: int = 5000) -> np.ndarray:
    # Long-tailed like speech or sensor logs: log-normal, 20 to 2000 steps.
    rng = np.random.default_rng(1)
    return np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=n), 20, 2000).astype(np.int64)


def _split(lengths: np.ndarray, shift: float = 0.0) -> SplitArrays:
    """Sequence i: ``lengths[i]`` steps of one feature, each ``i + shift``; its label i mod 7."""
    features = [np.full((int(n), 1), i + shift, dtype=np.float32) for i, n in enumerate(lengths)]
    return pack(features, np.arange(len(lengths)) % 7, None)


def _batches(split: SplitArrays, rank: int = 0, world: int = 1, global_batch: int = 24, **kw) -> SequenceBatches:
    kw = {"seed": 3, **kw}
    return SequenceBatches(split, global_batch_size=global_batch, rank=rank, world_size=world, device=CPU, **kw)


def _ids(batch) -> list[int]:
    """The sequences a padded batch holds, in row order."""
    return [int(v) for v in batch.x[:, 0, 0]]


def test_global_batches_do_not_depend_on_the_world_size_and_ranks_share_a_bucket() -> None:
    lengths = _lengths(1000)
    split = _split(lengths)
    one = list(_batches(split, pool=8).epoch(2))  # 1000 // 24 = 41 steps, in 6 sorting pools
    assert len(one) == 41 and all(len(b.x) == 24 for b in one)
    for world in (2, 3):
        ranks = [list(_batches(split, r, world, pool=8).epoch(2)) for r in range(world)]
        for step, whole in enumerate(one):
            shares = [_ids(ranks[r][step]) for r in range(world)]
            assert all(len(s) == 24 // world for s in shares), (world, step)
            together = [i for s in shares for i in s]
            assert len(set(together)) == 24, (world, step)  # the ranks' shares are disjoint
            assert sorted(together) == sorted(_ids(whole)), (world, step)
            # Each rank divides a per-step loss by the real steps of the whole global batch.
            assert {ranks[r][step].global_steps for r in range(world)} == {whole.global_steps}
            assert whole.global_steps == int(lengths[_ids(whole)].sum())
        # The ranks share each batch's bucket: every rank pads about as long as the whole batch (one
        # taking the shortest slice of a batch would pad half as long and wait at every step).
        padded = [sum(b.x.shape[1] for b in r) for r in ranks]
        assert min(padded) >= 0.75 * sum(b.x.shape[1] for b in one), (world, padded)
    # A pure function of the lengths (not of what the sequences hold), the batch, the seed and the epoch.
    other = _batches(_split(lengths, shift=0.5), pool=8)
    np.testing.assert_array_equal(other.global_batches(2), np.array([_ids(b) for b in one]))
    # Every rank's share of a batch spans about the same lengths as the batch.
    batches = bucketed_batches(_lengths(), 64, seed=3, epoch=2)
    spans = [_lengths()[rank_share(batches, r, 4)[0]] for r in range(4)]
    assert max(s.max() for s in spans) <= 1.2 * min(s.max() for s in spans)


def test_each_sequence_once_per_epoch_the_remainder_skipped_and_a_new_order_every_epoch() -> None:
    lengths = _lengths(120)
    split = _split(lengths)
    seen = {}
    for epoch in (0, 1):
        # 120 sequences, global batch 12 over 3 ranks: 10 steps take every sequence exactly once.
        got = [i for r in range(3) for b in _batches(split, r, 3, global_batch=12).epoch(epoch) for i in _ids(b)]
        assert sorted(got) == list(range(120)), epoch
        seen[epoch] = _batches(split, global_batch=12).global_batches(epoch)
    assert not np.array_equal(seen[0], seen[1])  # a new order every epoch ...
    assert not np.array_equal(seen[0], _batches(split, global_batch=12, seed=4).global_batches(0))  # ... and seed
    # 125 sequences: the 125 mod 12 = 5 left over after the last full batch are skipped that epoch
    # (none twice); the next epoch's shuffle skips others: over three epochs every sequence trains.
    split = _split(_lengths(125))
    skipped, trained = [], set()
    for epoch in (0, 1, 2):
        got = [i for r in range(3) for b in _batches(split, r, 3, global_batch=12).epoch(epoch) for i in _ids(b)]
        assert len(got) == len(set(got)) == 120, epoch
        skipped.append(set(range(125)) - set(got))
        trained |= set(got)
    assert [len(s) for s in skipped] == [5, 5, 5] and skipped[0] != skipped[1] != skipped[2]
    assert trained == set(range(125))


def test_bucketing_pads_under_ten_percent_where_random_batches_pad_most() -> None:
    split = _split(_lengths())
    mean, logged = {}, {}
    for bucket in (True, False):
        batches = _batches(split, 0, 2, global_batch=64, seed=0, bucket=bucket)  # sequences.bucket
        mean[bucket] = np.mean([1 - float(b.lengths.sum()) / b.x.shape[0] / b.x.shape[1] for b in batches.epoch(0)])
        logged[bucket] = batches.window_metrics(1.0)["train/pad_fraction"]  # what the job logs: padded steps / all
    print(f"padding per batch: bucketed {mean[True]:.3f}, random batches {mean[False]:.3f}; logged {logged}")
    assert mean[True] <= 0.10 < 0.5 <= mean[False]
    assert logged[True] <= 0.15 < 0.5 <= logged[False]  # long batches weigh more: 0.105 and 0.80


def test_an_epoch_from_start_step_k_is_the_full_epoch_from_step_k_on_any_world_size() -> None:
    lengths = _lengths(600)
    split = _split(lengths)
    full = list(_batches(split, pool=8).epoch(1))  # 25 steps on one rank
    steps = len(full)
    assert steps == 25
    for k in (0, 11, steps - 1, steps, steps + 3):
        # The same world size: the very same padded batches, from step k on.
        part = list(_batches(split, pool=8).epoch(1, start_step=k))
        assert len(part) == max(0, steps - k), k  # from past the end: nothing (the epoch is done)
        for a, b in zip(full[k:], part, strict=True):
            assert all(torch.equal(t, u) for t, u in zip(a[:3], b[:3], strict=True)) and a[3] == b[3], k
        # A restart on 3 ranks: the ranks' batches from step k on make up the same global batches.
        ranks = [list(_batches(split, r, 3, pool=8).epoch(1, start_step=k)) for r in range(3)]
        assert all(len(r) == max(0, steps - k) for r in ranks), k
        for step, whole in enumerate(full[k:]):
            joined = sorted(i for r in ranks for i in _ids(r[step]))
            assert joined == sorted(_ids(whole)), (k, step)
