"""The sine task as a job: exact mid-sequence resume on any world size, the seed config's MSE bar, evaluate."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config, to_dict
from rnnddp.data.batches import Split
from rnnddp.dist import DistInfo
from rnnddp.models import build_model, regressor_args
from rnnddp.tasks import TASKS
from tests.conftest import REPO, final_eval, job_env, latest_state, read_metrics, run_job
from tests.unit.test_sine import SMALL


def _params(run: Path) -> dict[str, torch.Tensor]:
    return latest_state(run)["model"]


def test_resume_in_the_middle_of_a_sequence_is_exact_and_survives_a_world_size_change(tmp_path: Path):
    # Step 25 is chunk 5 of the second batch: the carried state must come back from the checkpoint.
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/ref"], nproc=2)
    run_job([*SMALL, "train.max_steps=25", f"run_dir={tmp_path}/cut"], nproc=2)
    assert latest_state(tmp_path / "cut")["carry"] is not None
    shutil.copytree(tmp_path / "cut", tmp_path / "mix")  # the same 2-rank run at step 25, resumed on 1 below
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/cut"], nproc=2)
    ref, cut = _params(tmp_path / "ref"), _params(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "2 ranks: resumed run differs from the uninterrupted one"

    # 2 ranks to step 25, then 1 process on: the global batch's state is re-sliced, so it matches the
    # uninterrupted 2-rank run (to 1e-5: one process sums the batch in another order).
    run_job([*SMALL, "train.max_steps=50", f"run_dir={tmp_path}/mix"], nproc=1)
    mix = _params(tmp_path / "mix")
    worst = max((ref[k] - mix[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, f"2 -> 1 rank resume differs by {worst}"


def test_seed_sine_two_ranks_reaches_mse_bar_and_evaluate_agrees(tmp_path: Path):
    run = tmp_path / "run"
    proc = run_job(
        ["--config", "configs/seed_sine.yaml", "wandb.mode=offline", "eval.plots=true", f"run_dir={run}"], nproc=2
    )
    mse = final_eval(run, "mse")["test/mse"]
    assert mse <= 0.01, proc.stdout[-2000:]
    assert [m for m in read_metrics(run) if "val/mse" in m]  # best.pt was picked on validation sequences

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
    cfg = load_config(["--config", str(REPO / "configs/seed_sine.yaml"), "eval.batch_size=4096"])
    task = TASKS["sine_regression"](cfg, DistInfo())
    test = task.load().test
    chunk = cfg.sine.chunk_len
    chunks = Split(test.inputs.reshape(-1, chunk, 1), test.targets.reshape(-1, chunk, 1))
    reset = task.evaluate(model, chunks, contextlib.nullcontext())["mse"]
    assert reset > 3 * mse, (reset, mse)

    for name in ("learning_curves", "sine_prediction"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = sorted(p.name for p in (run / "wandb").rglob("media/images/plots/*.png"))
    assert [n.startswith("sine_prediction_") for n in logged].count(True) == 1, logged  # also a W&B image


def test_predict_refuses_a_sine_checkpoint_in_one_line(tmp_path: Path):
    from PIL import Image

    cfg = load_config(SMALL)
    args = regressor_args(cfg.model)
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
        "rnnddp-predict takes digit images (task=classify) or sequences (the sequence tasks)"
    ]


def test_resume_refuses_other_sequences_and_survives_a_precision_change(tmp_path: Path):
    run = tmp_path / "run"
    run_job([*SMALL, "train.precision=bf16", "train.max_steps=25", f"run_dir={run}"])
    carry = latest_state(run)["carry"]
    assert carry[0].dtype == torch.float32  # stored in fp32 whatever autocast produced
    ckpt = run / "checkpoints" / "step_0000025.pt"
    for key, before, now in [("sine.chunk_len", 10, 20), ("train.global_batch_size", 32, 64), ("seed", 0, 1)]:
        proc = run_job([*SMALL, "train.max_steps=50", f"{key}={now}", f"run_dir={run}"], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: checkpoint {ckpt} was trained with {key}={before}, the config says {now}; "
            f"set {key}={before} to resume that run, or start a new run with name=NEW"
        ]
    run_job([*SMALL, "train.precision=fp32", "train.max_steps=50", f"run_dir={run}"])  # bf16 -> fp32 mid-sequence
    assert latest_state(run)["global_step"] == 50
