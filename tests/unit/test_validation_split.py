"""The validation split: held out of the training set, the same samples whatever the seed or world size."""

from __future__ import annotations

import pytest
import torch

from rnnddp.config import load_config
from rnnddp.data.batches import Split, TrainBatches, hold_out
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.tasks import TASKS


def _ids(n: int) -> Split:
    return Split(torch.arange(n), torch.arange(n))  # each sample's input is its own index


def test_hold_out_is_disjoint_complete_and_fixed():
    rest, held = hold_out(_ids(1000), 100, seed=7)
    assert len(held) == 100 and len(rest) == 900
    assert set(held.inputs.tolist()).isdisjoint(rest.inputs.tolist())
    assert sorted(held.inputs.tolist() + rest.inputs.tolist()) == list(range(1000))
    again, _ = hold_out(_ids(1000), 100, seed=7)
    assert torch.equal(again.inputs, rest.inputs)  # a function of the seed alone
    assert not torch.equal(hold_out(_ids(1000), 100, seed=8)[1].inputs, held.inputs)
    assert not torch.equal(held.inputs, torch.arange(100))  # drawn, not the first images
    with pytest.raises(UserError, match="data.val_size=1000 must be at least 0 and less than the 1000"):
        hold_out(_ids(1000), 1000, seed=7)


def test_no_rank_ever_trains_on_a_validation_sample():
    rest, held = hold_out(_ids(1000), 100, seed=7)
    val = set(held.inputs.tolist())
    for world in (1, 2, 4):
        for rank in range(world):
            tb = TrainBatches(
                rest, global_batch_size=40, rank=rank, world_size=world, seed=0, device=torch.device("cpu")
            )
            for epoch in range(3):
                seen = {int(i) for batch, _ in tb.epoch(epoch) for i in batch}
                assert seen and seen.isdisjoint(val)


def test_classify_holds_out_val_size_training_images_not_test_ones(mnist_root):
    def splits(*overrides: str):
        cfg = load_config([f"data.root={mnist_root}", "data.download=false", *overrides])
        return TASKS["classify"](cfg, DistInfo()).load()

    s = splits()
    assert (len(s.train), len(s.val), len(s.test)) == (55_000, 5_000, 10_000)
    other_seed = splits("seed=3")
    assert torch.equal(other_seed.val.inputs, s.val.inputs)  # one validation set for every run
    # The validation images are not among the training images left, nor among the test images.
    val_rows = {bytes(r.numpy()) for r in s.val.inputs.flatten(1)}
    train_rows = {bytes(r.numpy()) for r in s.train.inputs.flatten(1)}
    test_rows = {bytes(r.numpy()) for r in s.test.inputs.flatten(1)}
    assert len(val_rows & train_rows) < 10  # MNIST has a few duplicate images; a leak would be thousands
    assert len(val_rows & test_rows) < 10
    none = splits("data.val_size=0")
    assert none.val is None and len(none.train) == 60_000
