"""The sine task (sin -> cos, hidden state carried from chunk to chunk): data, state plumbing, real runs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rnnddp.config import load_config
from rnnddp.models import build_model, regressor_args
from rnnddp.tasks.sine_regression import ChunkBatches, make_split, make_splits
from rnnddp.train.carry import block_rows, interleaved_rows, merge_states, slice_state
from tests.conftest import REPO, job_env

CPU = torch.device("cpu")
# Small and quick: 256 sequences of 200 steps in chunks of 10, global batch 32 -> 160 steps/epoch.
SMALL = [
    "task=sine_regression",
    "sine.sequences=256",
    "sine.val_sequences=64",
    "sine.test_sequences=64",
    "model.cell=lstm",
    "model.hidden_size=16",
    "train.global_batch_size=32",
    "sched.name=constant",
    "optim.lr=0.01",
    "train.log_every_steps=1",
    "checkpoint.every_steps=0",
    "wandb.mode=disabled",
]


def test_sequences_are_sin_in_cos_out_with_a_fixed_test_set():
    split = make_split(8, 50, seed=3)
    assert split.inputs.shape == split.targets.shape == (8, 50, 1)
    # Recover each phase from the first step; every step then follows sin/cos of phase + k*pi/10.
    phase = torch.atan2(split.inputs[:, 0, 0], split.targets[:, 0, 0]).double()
    t = phase[:, None] + math.pi / 10 * torch.arange(50, dtype=torch.float64)
    assert torch.allclose(split.inputs[..., 0].double(), torch.sin(t), atol=1e-5)
    assert torch.allclose(split.targets[..., 0].double(), torch.cos(t), atol=1e-5)
    assert phase.std() > 0.5  # random phases, not one sequence repeated
    cfg = load_config(SMALL)
    run0, run1 = make_splits(cfg.sine, seed=0), make_splits(cfg.sine, seed=1)
    assert not torch.equal(run0.train.inputs, run1.train.inputs)
    assert torch.equal(run0.test.inputs, run1.test.inputs)  # held-out sets: the same for every run
    assert torch.equal(run0.val.inputs, run1.val.inputs)
    assert len(run0.val) == len(run0.test) == 64
    assert not torch.equal(run0.val.inputs, run0.test.inputs)  # validation is not the test set


def test_chunks_walk_each_sequence_in_order_and_ranks_split_the_global_batch():
    split = make_split(64, 40, seed=0)
    kw = dict(global_batch_size=16, chunk_len=10, seed=5, device=CPU)
    one = ChunkBatches(split, rank=0, world_size=1, **kw)
    two = [ChunkBatches(split, rank=r, world_size=2, **kw) for r in range(2)]
    assert one.steps_per_epoch == (64 // 16) * 4
    steps = list(one.epoch(1))
    assert [new for _, _, new in steps] == [True, False, False, False] * 4
    # The chunks of one batch are consecutive slices of the same sequences.
    whole = torch.cat([x for x, _, _ in steps[:4]], dim=1)
    first_rows = torch.stack([row for row in split.inputs if any(torch.equal(row, w) for w in whole)])
    assert len(first_rows) == 16
    # Rank r holds positions r, r+2, ... of every global batch (the images' rule).
    for (x1, y1, n1), (xa, ya, na), (xb, yb, nb) in zip(steps, two[0].epoch(1), two[1].epoch(1), strict=True):
        assert n1 == na == nb
        assert torch.equal(x1[0::2], xa) and torch.equal(y1[0::2], ya)
        assert torch.equal(x1[1::2], xb) and torch.equal(y1[1::2], yb)
    resumed = list(one.epoch(1, start_step=6))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, steps[6:], strict=True))


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_carried_state_survives_any_change_of_world_size(cell: str):
    layers, batch, hidden = 2, 12, 5
    h = torch.randn(layers, batch, hidden)
    state = (h, torch.randn_like(h)) if cell == "lstm" else h
    for rows in (interleaved_rows, block_rows):
        for world in (1, 2, 3, 4):
            owned = [rows(r, world, batch) for r in range(world)]
            parts = [slice_state(state, o, CPU) for o in owned]
            merged = merge_states(parts, owned, batch)
            for a, b in zip(merged if cell == "lstm" else [merged], state if cell == "lstm" else [state], strict=True):
                assert torch.equal(a, b)
    # Two ranks' local sample j is global sample 2j + r (sine); a block of stripes each (language model).
    assert torch.equal(slice_state(h, interleaved_rows(1, 2, batch), CPU), h[:, 1::2])
    assert torch.equal(slice_state(h, block_rows(1, 2, batch), CPU), h[:, 6:])
    assert merge_states([None, None], [interleaved_rows(r, 2, batch) for r in range(2)], batch) is None


def test_model_predicts_every_step_and_the_config_refuses_what_cannot_work():
    cfg = load_config(SMALL)
    model = build_model(regressor_args(cfg.model))
    x = torch.randn(3, 10, 1)
    out, (h, c) = model(x)
    assert out.shape == (3, 10, 1) and h.shape == (1, 3, 16)
    # Carrying the state is the same computation as one longer sequence.
    a, state = model(x[:, :4])
    b, _ = model(x[:, 4:], state)
    assert torch.allclose(torch.cat([a, b], dim=1), out, atol=1e-6)
    for bad, needle in [
        (["sine.length=95"], "not a multiple of sine.chunk_len"),
        (["model.bidirectional=true"], "causal recurrent model"),
        (["model.name=cnn"], "causal recurrent model"),
    ]:
        proc = subprocess.run(
            [sys.executable, str(REPO / "train_ddp.py"), *SMALL, *bad],
            env=job_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_choice_values_are_case_insensitive():
    cfg = load_config(["task=Sine_Regression", "model.cell=RNN", "dist.grad_sync=AllGather"])
    assert (cfg.task, cfg.model.cell, cfg.dist.grad_sync) == ("sine_regression", "rnn", "allgather")


def test_the_loss_carries_the_hidden_state_into_the_next_chunk():
    import contextlib

    import torch.nn.functional as F

    from rnnddp.dist import DistInfo
    from rnnddp.tasks.sine_regression import SineRegression

    cfg = load_config(SMALL)
    task = SineRegression(cfg, DistInfo())
    torch.manual_seed(0)
    model = build_model(task.model_args())
    chunks = task.train_batches(task.load().train).epoch(0)
    first, second = next(chunks), next(chunks)
    assert first[2] and not second[2]  # a new batch of sequences, then its next chunk
    ctx = contextlib.nullcontext()
    task.loss(model, first, ctx)
    _, state = model(first[0])
    assert task.carried.state is not None and all(
        torch.equal(a, b) for a, b in zip(task.carried.state, state, strict=True)
    )
    loss = task.loss(model, second, ctx)
    carried, _ = model(second[0], state)
    from_zero, _ = model(second[0])
    assert torch.allclose(loss, F.mse_loss(carried, second[1]))
    assert not torch.allclose(loss, F.mse_loss(from_zero, second[1]))
    assert not task.carried.state[0].requires_grad  # detached: no gradient into earlier chunks
