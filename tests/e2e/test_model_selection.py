"""Model selection looks at the validation split only; the test set is evaluated once, on the final model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from rnnddp.checkpoint import CheckpointManager
from tests.conftest import REPO, final_eval, job_env, latest_state, read_metrics, run_job

ARGS = [
    "model.hidden_size=24",
    "train.global_batch_size=64",
    "train.max_steps=120",
    "eval.every_steps=10",
    "checkpoint.every_steps=0",
    "sched.name=constant",
    "optim.lr=0.02",  # high enough that validation accuracy goes down as well as up
    "wandb.mode=disabled",
]


def test_best_checkpoint_is_the_best_validation_result_and_test_comes_last(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    proc = run_job([*ARGS, f"data.root={mnist_root}", f"run_dir={run}"], nproc=2)
    records = read_metrics(run)
    val = [(i, r) for i, r in enumerate(records) if "val/accuracy" in r]
    test = [(i, r) for i, r in enumerate(records) if any(k.startswith("test/") for k in r)]
    assert len(val) == 12, [r["step"] for _, r in val]  # every 10 steps, the last one at step 120
    assert len(test) == 1 and test[0][0] > val[-1][0], "a test record before the last validation one"
    assert not any(k.startswith(("eval/", "test/")) for _, r in val for k in r)
    best_step, best = max(((r["step"], r["val/accuracy"]) for _, r in val), key=lambda sv: (sv[1], -sv[0]))
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert state["best_metric"] == best and state["global_step"] == best_step
    assert val[-1][1]["val/best_accuracy"] == best
    # The final line names both, and the test result is the final model's (the latest checkpoint).
    final = final_eval(run)
    assert latest_state(run)["global_step"] == final["step"] == 120
    # The same final model on two different splits: validation is not the test set in disguise.
    assert val[-1][1]["step"] == 120 and val[-1][1]["val/loss"] != final["test/loss"]
    assert f"done: best val accuracy {best:.4f}; final model: test accuracy {final['test/accuracy']:.4f}" in proc.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "rnnddp.evaluate", str(run / "checkpoints" / "step_0000120.pt"), "--no-plots"],
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and f"accuracy {final['test/accuracy']:.4f}  (10000 images)" in cli.stdout, cli.stderr


def test_a_checkpoint_from_before_the_validation_split_is_refused_but_evaluates(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    args = ["model.hidden_size=16", "train.max_steps=5", "wandb.mode=disabled", f"data.root={mnist_root}"]
    run_job([*args, f"run_dir={run}"])
    old = latest_state(run)
    del old["format"]  # as every checkpoint written before the validation split (trained on all 60,000)
    del old["config"]["data"]["val_size"], old["config"]["sine"]
    path = CheckpointManager(tmp_path / "old").save(old, 5)
    proc = run_job([*args, "train.max_steps=10", f"run_dir={tmp_path / 'old'}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {path} was written before the validation split existed (its training set held the "
        "validation images), so it cannot be resumed; evaluate it with rnnddp-evaluate, or start a new run with "
        "another name="
    ]
    cli = subprocess.run(
        [sys.executable, "-m", "rnnddp.evaluate", str(path), f"data.root={mnist_root}", "--no-plots"],
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and "(10000 images)" in cli.stdout, cli.stderr


def test_a_run_stopped_before_its_final_test_is_tested_on_rerun(tmp_path: Path, mnist_root):
    # As if the job were killed between its last checkpoint and the end of its final test.
    run = tmp_path / "run"
    args = [
        "model.hidden_size=16",
        "train.max_steps=20",
        "wandb.mode=disabled",
        f"data.root={mnist_root}",
        f"run_dir={run}",
    ]
    run_job(args)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    kept = [ln for ln in lines if '"test/' not in ln and '"event": "finished"' not in ln]
    assert len(kept) == len(lines) - 2
    metrics.write_text("\n".join(kept) + "\n")
    again = run_job(args)
    assert "was trained to step 20; testing its final model" in again.stdout, again.stdout[-2000:]
    records = read_metrics(run)
    assert [r["step"] for r in records if "train/loss" in r] == [20]  # nothing trained twice
    assert final_eval(run)["step"] == 20 and records[-1]["event"] == "finished"
    third = run_job(args)
    assert "already finished at step 20" in third.stdout


def test_resume_refuses_another_validation_split_or_global_batch(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    args = ["model.hidden_size=16", "wandb.mode=disabled", f"data.root={mnist_root}", f"run_dir={run}"]
    run_job([*args, "train.max_steps=5"])
    ckpt = run / "checkpoints" / "step_0000005.pt"
    for key, before, now in [("data.val_size", 5000, 4000), ("train.global_batch_size", 128, 64)]:
        proc = run_job([*args, "train.max_steps=10", f"{key}={now}"], check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"error: checkpoint {ckpt} was trained with {key}={before}, the config says {now}; "
            f"set {key}={before} to resume that run, or start a new run with name=NEW"
        ]
