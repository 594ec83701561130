"""The length-bucketed order: world-size free, each sequence once per epoch, little padding, exact resume."""

from __future__ import annotations

import numpy as np

from rnnddp.data.buckets import bucketed_batches, pad_fraction, rank_share


def _lengths(n: int = 5000) -> np.ndarray:
    # Long-tailed like speech or sensor logs: log-normal, 20 to 2000 steps.
    rng = np.random.default_rng(1)
    return np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=n), 20, 2000).astype(np.int64)


def test_global_batches_do_not_depend_on_the_world_size_and_ranks_share_a_bucket() -> None:
    lengths = _lengths()
    batches = bucketed_batches(lengths, 64, seed=3, epoch=2)
    for world in (1, 2, 4, 8):
        shares = [rank_share(batches, r, world) for r in range(world)]
        assert all(s.shape == (len(batches), 64 // world) for s in shares)
        together = np.sort(np.concatenate(shares, axis=1), axis=1)
        np.testing.assert_array_equal(together, np.sort(batches, axis=1))
    # Every rank's share of a batch spans about the same lengths as the batch.
    spans = [lengths[rank_share(batches, r, 4)[0]] for r in range(4)]
    assert max(s.max() for s in spans) <= 1.2 * min(s.max() for s in spans)


def test_each_sequence_at_most_once_per_epoch_and_a_new_order_every_epoch() -> None:
    lengths = _lengths(1000)
    a, b = bucketed_batches(lengths, 64, 0, 0), bucketed_batches(lengths, 64, 0, 1)
    assert a.shape == (1000 // 64, 64)
    assert len(np.unique(a)) == a.size  # no sequence twice
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, bucketed_batches(lengths, 64, 0, 0))  # a pure function of seed and epoch
    assert not np.array_equal(a, bucketed_batches(lengths, 64, 1, 0))


def test_bucketing_pads_under_ten_percent_where_random_batches_pad_most() -> None:
    lengths = _lengths()
    bucketed = np.mean([pad_fraction(lengths[b]) for b in rank_share(bucketed_batches(lengths, 64, 0, 0), 0, 2)])
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(lengths))[: 78 * 32].reshape(78, 32)
    unbucketed = np.mean([pad_fraction(lengths[b]) for b in shuffled])
    print(f"padding: bucketed {bucketed:.3f}, random batches {unbucketed:.3f}")
    assert bucketed <= 0.10 < 0.5 <= unbucketed


def test_a_resume_mid_epoch_continues_with_the_same_batches_on_another_world_size() -> None:
    lengths = _lengths(2000)
    before = rank_share(bucketed_batches(lengths, 64, 7, 1), 0, 1)[10:]  # 1 rank, from step 10 on
    after = bucketed_batches(lengths, 64, 7, 1)[10:]  # a restart on 4 ranks recomputes the epoch
    joined = np.concatenate([rank_share(after, r, 4) for r in range(4)], axis=1)
    np.testing.assert_array_equal(np.sort(joined, axis=1), np.sort(before, axis=1))
