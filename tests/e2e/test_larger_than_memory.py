"""A prepared data set larger than the memory the job may use trains: 2 torchrun ranks inside a cgroup
(v1 memory controller) whose limit is below the size of the training features."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rnnddp.data.sequences import SplitArrays, pack, write_prepared
from tests.conftest import REPO, final_eval, job_cmd, job_env

pytestmark = pytest.mark.slow
MEMORY = Path("/sys/fs/cgroup/memory")
GIB = 1 << 30
LIMIT = 3 * GIB // 2  # the job's memory: 1.5 GiB, page cache included
FEATURES = 40


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    reason = None if os.geteuid() == 0 else "a memory cgroup needs root"
    if reason is None and not (MEMORY / "memory.limit_in_bytes").is_file():
        reason = "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if reason:
        if os.environ.get("RNNDDP_REQUIRE_CGROUP"):
            pytest.fail(reason)
        pytest.skip(reason)
    group = MEMORY / f"rnnddp-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # swap accounting: no swapping past the limit either
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        for _ in range(100):  # the job's processes leave the group as they exit
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _split(rng: np.random.Generator, n: int) -> SplitArrays:
    lengths = rng.integers(300, 700, size=n)
    return pack(
        [rng.standard_normal((int(t), FEATURES), dtype=np.float32) for t in lengths], rng.integers(0, 2, n), None
    )


def _big_train(folder: Path, rng: np.random.Generator, size: int) -> SplitArrays:
    """About ``size`` bytes of features, written to a mapped file in chunks (never whole in memory)."""
    lengths = rng.integers(300, 700, size=size // (4 * FEATURES * 500))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    features = np.lib.format.open_memmap(
        folder / "src.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]), FEATURES)
    )
    for start in range(0, len(features), 1 << 20):
        part = features[start : start + (1 << 20)]
        part[:] = rng.standard_normal(part.shape, dtype=np.float32)
    features.flush()
    return SplitArrays(features, offsets, rng.integers(0, 2, len(lengths)))


def test_a_data_set_larger_than_the_memory_limit_trains_on_two_ranks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = _big_train(tmp_path, rng, size=2 * GIB + GIB // 8)
    data = write_prepared(
        tmp_path / "big", {"train": train, "val": _split(rng, 256), "test": _split(rng, 256)}, ["a", "b"], {}
    )
    sequences = len(train)
    del train
    (tmp_path / "src.npy").unlink()
    size = (data / "train.features.npy").stat().st_size
    assert size > LIMIT + GIB // 2, size
    args = [
        "task=sequence_classification", f"sequences.path={data}", "model.hidden_size=16", "train.epochs=1",
        "train.global_batch_size=64", "train.log_every_steps=50", "eval.batch_size=256", "wandb.mode=disabled",
        f"run_dir={tmp_path}/run",
    ]  # fmt: skip
    with memory_cgroup(LIMIT) as group:
        enter = group / "cgroup.procs"
        proc = subprocess.run(
            job_cmd(args, nproc=2), env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=900,
            preexec_fn=lambda: enter.write_text(str(os.getpid())),  # torchrun and its ranks inside the limit
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
