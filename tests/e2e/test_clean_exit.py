"""Finished runs leave cleanly: short 2-rank jobs (W&B offline), two at a time, every one exit 0 on every rank.

Every finished job in the suite is also held to this (``tests.conftest.assert_clean_exit`` in ``run_job``):
dozens of 2-rank exits per run. This test adds exits that race against a busy machine, two jobs at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import final_eval, run_job

pytestmark = pytest.mark.slow
ARGS = ["model.hidden_size=32", "train.global_batch_size=64", "train.max_steps=10", "eval.batch_size=2500"]
JOBS = 2


def test_finished_two_rank_jobs_run_two_at_a_time_all_exit_0(tmp_path: Path, mnist_root):
    def one(i: int) -> int:
        run = tmp_path / f"run{i}"
        # run_job's check: exit 0 and a clean exit (assert_clean_exit), else an AssertionError with the output.
        run_job([*ARGS, "wandb.mode=offline", f"data.root={mnist_root}", f"run_dir={run}"], nproc=2)
        return final_eval(run)["step"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(one, range(JOBS))) == [10] * JOBS  # map re-raises a job's failure here
