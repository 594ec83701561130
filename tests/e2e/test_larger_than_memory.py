"""A prepared data set larger than the memory the job may use trains, validates and tests: 2 torchrun ranks
inside a cgroup (v1 memory controller) whose limit is below the data set's size, and below what its
processes need plus any one of its splits, so that each split is read in batches, the validation and
test splits by rank 0 alone. The limit leaves room above the processes' own memory (1.3-1.6 GiB, torchrun's
included, varying with the machine) for the libraries' pages, which a tighter limit turned into OOM kills."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.memory import GIB, MEMORY, big_prepared, memory_cgroup, train_args, watch_ranks
from tests.conftest import REPO, final_eval, job_cmd, job_env, val_records

pytestmark = [pytest.mark.slow, pytest.mark.system]  # a cgroup v1 memory limit: root
LIMIT = 9 * GIB // 4  # the job's memory: 2.25 GiB, page cache included
SPLIT = 5 * GIB // 4  # the features of each split (train, validation, test)
STEP_CLASSES = 10  # a class at every step: whole-split evaluation held its outputs per step and class


def _memory_controller() -> None:
    reason = None if os.geteuid() == 0 else "a memory cgroup needs root"
    if reason is None and not (MEMORY / "memory.limit_in_bytes").is_file():
        reason = "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if reason:
        if os.environ.get("RNNDDP_REQUIRE_CGROUP"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_a_data_set_larger_than_the_memory_limit_trains_validates_and_tests_on_two_ranks(tmp_path: Path) -> None:
    _memory_controller()
    data, sequences = big_prepared(tmp_path, SPLIT, eval_size=SPLIT, step_classes=STEP_CLASSES)
    size = {s: (data / f"{s}.features.npy").stat().st_size for s in ("train", "val", "test")}
    total = sum(f.stat().st_size for f in data.iterdir())
    assert total > LIMIT + GIB // 2, total
    run, log = tmp_path / "run", tmp_path / "job.log"
    start = time.perf_counter()
    with memory_cgroup(LIMIT) as group, log.open("w") as output:
        enter = group / "cgroup.procs"
        proc = subprocess.Popen(
            # The defaults users get, pictures included.
            job_cmd([*train_args(data, run, "step_classification"), "eval.plots=true"], nproc=2),
            env=job_env(),
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: enter.write_text(str(os.getpid())),  # torchrun and its ranks
        )
        procs = watch_ranks(proc, launcher=True)  # until it exits
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
        oom = (group / "memory.oom_control").read_text()
    took = time.perf_counter() - start
    # The processes' own memory (torchrun's and the ranks'), each at its largest: what the limit cannot reclaim.
    own = sum(kib.get("RssAnon", 0) for kib in procs.values()) * 1024
    print(
        f"features: train {size['train'] / GIB:.2f} GiB, validation {size['val'] / GIB:.2f} GiB, test "
        f"{size['test'] / GIB:.2f} GiB ({total / GIB:.2f} GiB on disk); limit {LIMIT / GIB:.2f} GiB, torchrun's and the "
        f"ranks' own memory at most {own / GIB:.2f} GiB; peak use {peak / GIB:.2f} GiB (page cache included), "
        f"{failcnt} times at the limit; {took:.0f} s"
    )
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert "oom_kill 0" in oom or "oom_kill" not in oom, oom
    assert peak <= LIMIT
    # No split fits in what the limit leaves beside the processes' own memory.
    assert len(procs) == 3 and min(size.values()) > LIMIT - own, (size, own)
    # One epoch: every training sequence was read (N // 64 steps), validated, the final model tested.
    assert final_eval(run)["step"] == sequences // 64
    assert [r["step"] for r in val_records(run)] == [sequences // 64]
