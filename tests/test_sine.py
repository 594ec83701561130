"""The sine task (sin -> cos, hidden state carried from chunk to chunk): data, state plumbing, real runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnddp.config import load_config
from rnnddp.data import Split
from rnnddp.models import build_model, model_args
from rnnddp.sine import ChunkBatches, evaluate_sine, make_split, make_splits, merge_states, rank_state
from tests.conftest import REPO, job_env, latest_state, read_metrics, run_job

CPU = torch.device("cpu")
# Small and quick: 256 sequences of 200 steps in chunks of 10, global batch 32 -> 160 steps/epoch.
SMALL = [
    "task=sine_regression",
    "data.sine_sequences=256",
    "data.sine_test_sequences=64",
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
    assert split.images.shape == split.labels.shape == (8, 50, 1)
    # Recover each phase from the first step; every step then follows sin/cos of phase + k*pi/10.
    phase = torch.atan2(split.images[:, 0, 0], split.labels[:, 0, 0]).double()
    t = phase[:, None] + math.pi / 10 * torch.arange(50, dtype=torch.float64)
    assert torch.allclose(split.images[..., 0].double(), torch.sin(t), atol=1e-5)
    assert torch.allclose(split.labels[..., 0].double(), torch.cos(t), atol=1e-5)
    assert phase.std() > 0.5  # random phases, not one sequence repeated
    cfg = load_config(SMALL)
    train0, test0 = make_splits(cfg.data, seed=0)
    train1, test1 = make_splits(cfg.data, seed=1)
    assert not torch.equal(train0.images, train1.images)
    assert torch.equal(test0.images, test1.images)  # held-out set: the same for every run


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
    first_rows = torch.stack([row for row in split.images if any(torch.equal(row, w) for w in whole)])
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
    for world in (1, 2, 3, 4):
        parts = [rank_state(state, r, world, CPU) for r in range(world)]
        merged = merge_states(parts)
        for a, b in zip(merged if cell == "lstm" else [merged], state if cell == "lstm" else [state], strict=True):
            assert torch.equal(a, b)
    # Two ranks' local sample j is global sample 2j + r.
    assert torch.equal(rank_state(h, 1, 2, CPU), h[:, 1::2])
    assert merge_states([None, None]) is None


def test_model_predicts_every_step_and_the_config_refuses_what_cannot_work():
    cfg = load_config(SMALL)
    model = build_model(model_args(cfg.model, task=cfg.task))
    x = torch.randn(3, 10, 1)
    out, (h, c) = model(x)
    assert out.shape == (3, 10, 1) and h.shape == (1, 3, 16)
    # Carrying the state is the same computation as one longer sequence.
    a, state = model(x[:, :4])
    b, _ = model(x[:, 4:], state)
    assert torch.allclose(torch.cat([a, b], dim=1), out, atol=1e-6)
    for bad, needle in [
        (["data.sine_length=95"], "not a multiple of data.chunk_len"),
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


def _params(run: Path) -> dict[str, torch.Tensor]:
    return latest_state(run)["model"]


def test_resume_in_the_middle_of_a_sequence_is_exact_and_survives_a_world_size_change(tmp_path: Path):
    # Step 25 is chunk 5 of the second batch: the carried state must come back from the checkpoint.
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/ref2"], nproc=2)
    run_job([*SMALL, "train.max_steps=25", f"run_dir={tmp_path}/cut2"], nproc=2)
    assert latest_state(tmp_path / "cut2")["carry"] is not None
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/cut2"], nproc=2)
    ref, cut = _params(tmp_path / "ref2"), _params(tmp_path / "cut2")
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "2 ranks: resumed run differs from the uninterrupted one"

    # 2 ranks to step 25, then 1 process on: the global batch's state is re-sliced, so it matches.
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/ref1"], nproc=1)
    run_job([*SMALL, "train.max_steps=25", f"run_dir={tmp_path}/mix"], nproc=2)
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/mix"], nproc=1)
    ref, mix = _params(tmp_path / "ref1"), _params(tmp_path / "mix")
    worst = max((ref[k] - mix[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, f"2 -> 1 rank resume differs by {worst}"


def test_seed_sine_two_ranks_reaches_mse_bar_and_evaluate_agrees(tmp_path: Path):
    run = tmp_path / "run"
    proc = run_job(["--config", "configs/seed_sine.yaml", "wandb.mode=offline", f"run_dir={run}"], nproc=2)
    evals = [m for m in read_metrics(run) if "eval/mse" in m]
    mse = evals[-1]["eval/mse"]
    assert mse <= 0.01, proc.stdout[-2000:]

    cli = subprocess.run(
        [sys.executable, "-m", "rnnddp.evaluate", str(run)], env=job_env(), cwd=REPO, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert f"test mse {mse:.6f}" in cli.stdout

    # The hidden state really is what carries the sequence: restarting it at every chunk of
    # the held-out sequences (what a job that forgot to carry it would learn from) is far worse.
    state = latest_state(run)
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    cfg = load_config(["--config", str(REPO / "configs/seed_sine.yaml")])
    _, test = make_splits(cfg.data, cfg.seed)
    chunks = Split(test.images.reshape(-1, cfg.data.chunk_len, 1), test.labels.reshape(-1, cfg.data.chunk_len, 1))
    reset = evaluate_sine(model, chunks, batch_size=4096, device=CPU)["mse"]
    assert reset > 3 * mse, (reset, mse)

    for name in ("learning_curves", "sine_prediction"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = sorted(p.name for p in (run / "wandb").rglob("media/images/plots/*.png"))
    assert [n.startswith("sine_prediction_") for n in logged].count(True) == 1, logged  # also a W&B image


def test_predict_refuses_a_sine_checkpoint_in_one_line(tmp_path: Path):
    from PIL import Image

    from rnnddp.checkpoint import CheckpointManager
    from rnnddp.config import to_dict

    cfg = load_config(SMALL)
    args = model_args(cfg.model, task=cfg.task)
    CheckpointManager(tmp_path / "run").save(
        {"model": build_model(args).state_dict(), "model_args": args, "config": to_dict(cfg), "global_step": 0}, 0
    )
    img = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(img)
    proc = subprocess.run(
        [sys.executable, "-m", "rnnddp.predict", str(tmp_path / "run"), str(img)],
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run' / 'checkpoints' / 'step_0000000.pt'} is a task=sine_regression model; "
        "predict classifies digit images only"
    ]


def test_resume_refuses_other_sequences_and_survives_a_precision_change(tmp_path: Path):
    run = tmp_path / "run"
    run_job([*SMALL, "train.precision=bf16", "train.max_steps=25", f"run_dir={run}"])
    carry = latest_state(run)["carry"]
    assert carry[0].dtype == torch.float32  # stored in fp32 whatever autocast produced
    ckpt = run / "checkpoints" / "step_0000025.pt"
    for key, before, now in [("data.chunk_len", 10, 20), ("train.global_batch_size", 32, 64), ("seed", 0, 1)]:
        proc = run_job([*SMALL, "train.max_steps=50", f"{key}={now}", f"run_dir={run}"], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: checkpoint {ckpt} was trained with {key}={before}, the config says {now}; "
            f"set {key}={before} or start a new run with another name="
        ]
    run_job([*SMALL, "train.precision=fp32", "train.max_steps=50", f"run_dir={run}"])  # bf16 -> fp32 mid-sequence
    assert latest_state(run)["global_step"] == 50


def test_choice_values_are_case_insensitive():
    cfg = load_config(["task=Sine_Regression", "model.cell=RNN", "dist.grad_sync=AllGather"])
    assert (cfg.task, cfg.model.cell, cfg.dist.grad_sync) == ("sine_regression", "rnn", "allgather")
