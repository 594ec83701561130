"""Finished runs leave cleanly: twenty short 2-rank jobs (W&B offline), every one exit 0 on every rank.

Two run at a time: the exits race against a busy machine, and the test takes half as long."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import final_eval, run_job

pytestmark = pytest.mark.slow
ARGS = ["model.hidden_size=32", "train.global_batch_size=64", "train.max_steps=10", "eval.batch_size=2500"]


def test_twenty_finished_two_rank_jobs_all_exit_0(tmp_path: Path, mnist_root):
    def one(i: int) -> tuple[int, int, str] | None:
        run = tmp_path / f"run{i}"
        proc = run_job([*ARGS, "wandb.mode=offline", f"data.root={mnist_root}", f"run_dir={run}"], nproc=2, check=False)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "terminate called" in out or "Traceback" in out:
            return i, proc.returncode, out[-1500:]
        return None if final_eval(run)["step"] == 10 else (i, 0, "no final test record")

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(one, range(20)) if f is not None]
    assert not failures, failures
