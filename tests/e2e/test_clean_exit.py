"""Finished runs leave cleanly: twenty short 2-rank jobs in a row (W&B offline), every one exit 0 on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import final_eval, run_job

pytestmark = pytest.mark.slow
ARGS = ["model.hidden_size=32", "train.global_batch_size=64", "train.max_steps=10", "eval.batch_size=2500"]


def test_twenty_finished_two_rank_jobs_all_exit_0(tmp_path: Path, mnist_root):
    failures = []
    for i in range(20):
        run = tmp_path / f"run{i}"
        proc = run_job([*ARGS, "wandb.mode=offline", f"data.root={mnist_root}", f"run_dir={run}"], nproc=2, check=False)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "terminate called" in out or "Traceback" in out:
            failures.append((i, proc.returncode, out[-1500:]))
        else:
            assert final_eval(run)["step"] == 10
    assert not failures, failures
