"""A prepared data set larger than the memory the job may use trains: 2 torchrun ranks inside a cgroup
(v1 memory controller) whose limit is below the size of the training features."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.memory import GIB, MEMORY, big_prepared, memory_cgroup, train_args
from tests.conftest import REPO, final_eval, job_cmd, job_env

pytestmark = pytest.mark.slow
LIMIT = 3 * GIB // 2  # the job's memory: 1.5 GiB, page cache included


def _memory_controller() -> None:
    reason = None if os.geteuid() == 0 else "a memory cgroup needs root"
    if reason is None and not (MEMORY / "memory.limit_in_bytes").is_file():
        reason = "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if reason:
        if os.environ.get("RNNDDP_REQUIRE_CGROUP"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_a_data_set_larger_than_the_memory_limit_trains_on_two_ranks(tmp_path: Path) -> None:
    _memory_controller()
    data, sequences = big_prepared(tmp_path, size=2 * GIB + GIB // 8)
    size = (data / "train.features.npy").stat().st_size
    assert size > LIMIT + GIB // 2, size
    with memory_cgroup(LIMIT) as group:
        enter = group / "cgroup.procs"
        proc = subprocess.run(
            job_cmd(train_args(data, tmp_path / "run"), nproc=2), env=job_env(), cwd=REPO, capture_output=True,
            text=True, timeout=900, preexec_fn=lambda: enter.write_text(str(os.getpid())),  # torchrun and its ranks
        )  # fmt: skip
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
        oom = (group / "memory.oom_control").read_text()
    print(
        f"features {size / GIB:.2f} GiB, limit {LIMIT / GIB:.2f} GiB: peak use {peak / GIB:.2f} GiB "
        f"(page cache included), {failcnt} times at the limit"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "oom_kill 0" in oom or "oom_kill" not in oom, oom
    assert peak <= LIMIT
    # One epoch: every training sequence was read (N // 64 steps), the final model tested.
    assert final_eval(tmp_path / "run")["step"] == sequences // 64
