"""Finished runs leave cleanly: short 2-rank jobs (W&B offline), two at a time, every one exit 0 on every rank.

Every finished job in the suite is also held to this (``tests.conftest.assert_clean_exit`` in ``run_job``):
dozens of 2-rank exits per run. This test adds exits that race against a busy machine, two jobs at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import assert_clean_exit, final_eval, run_job

pytestmark = pytest.mark.slow
ARGS = ["model.hidden_size=32", "train.global_batch_size=64", "train.max_steps=10", "eval.batch_size=2500"]
JOBS = 2


def test_finished_two_rank_jobs_run_two_at_a_time_all_exit_0(tmp_path: Path, mnist_root):
    def one(i: int) -> tuple[int, int, str] | None:
        run = tmp_path / f"run{i}"
        proc = run_job([*ARGS, "wandb.mode=offline", f"data.root={mnist_root}", f"run_dir={run}"], nproc=2, check=False)
        out = proc.stdout + proc.stderr
        try:
            assert proc.returncode == 0, f"exit {proc.returncode}"
            assert_clean_exit(out)
        except AssertionError as e:
            return i, proc.returncode, f"{e}"[-1500:]
        return None if final_eval(run)["step"] == 10 else (i, 0, "no final test record")

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(one, range(JOBS)) if f is not None]
    assert not failures, failures
