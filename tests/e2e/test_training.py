"""Accuracy bars on the real MNIST and the full 10k test set (the tutorials' figures)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import final_eval, read_metrics, run_job, val_records

pytestmark = pytest.mark.slow


def test_seed_lstm_two_ranks_one_epoch_reaches_96(tmp_path: Path, mnist_root):
    # The tutorial's model: LSTM-64, batch 64, Adam 0.01, one epoch; here split over 2 ranks.
    run = tmp_path / "seed"
    run_job(
        ["--config", "configs/seed_lstm.yaml", f"data.root={mnist_root}", "wandb.mode=offline", f"run_dir={run}"],
        nproc=2,
    )
    result = final_eval(run)
    assert result["test/accuracy"] >= 0.96, result
    assert val_records(run)[-1]["epoch"] == 1
    # W&B logged offline into the run directory, with the run id the checkpoint recorded.
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), list((run / "wandb").rglob("*"))


def test_default_config_reaches_98_5(tmp_path: Path, mnist_root):
    start = time.time()
    run = tmp_path / "default"
    run_job([f"data.root={mnist_root}", "wandb.mode=disabled", f"run_dir={run}"])
    result = final_eval(run)
    print(f"default config: accuracy {result['test/accuracy']:.4f} in {time.time() - start:.0f}s")
    assert result["test/accuracy"] >= 0.985, result
    lr = [m["train/lr"] for m in read_metrics(run) if "train/lr" in m]
    assert max(lr) > 10 * lr[-1]  # the one-cycle schedule really ran
