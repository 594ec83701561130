"""Denormal floats flushed to zero on every CPU thread: what makes the 784-step views train ~11x faster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, job_env

# Work large enough to run on every intra-op and BLAS thread, with denormal float32 results from
# normal inputs (1e-20 x 1e-19; 512 x 1e-44 in the matmul): non-zero wherever a thread does not flush.
PROBE = (
    "import torch; torch.set_num_threads(2)\n"
    "{before}"
    "from rnnddp.dist import flush_denormals\n"
    "ok = flush_denormals()\n"
    "a = torch.full((256, 512), 1e-22)\n"
    "left = int((a @ a.T).count_nonzero()) + int((torch.full((1 << 21,), 1e-20) * 1e-19).count_nonzero())\n"
    "print(ok, left)\n"
)

pytestmark = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero mode"
)  # False (and a no-op) where unsupported; True here just leaves the default, off, in place


def _probe(before: str = "") -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        env={**job_env(), "OMP_NUM_THREADS": "2"},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_flush_before_tensor_work_reaches_every_thread():
    ok, left = _probe()
    assert ok and left == 0


def test_flush_after_the_threads_started_is_detected():
    # The intra-op threads copy the mode only when they start: flushing late leaves theirs off,
    # and flush_denormals says so (this is why the entry points call it first).
    ok, left = _probe(before="x = torch.randn(300, 300); x @ x\n")
    assert not ok and left > 0


def test_the_job_flushes_before_its_first_tensor_work(tmp_path: Path):
    args = [
        "task=sine_regression",
        "sine.sequences=64",
        "sine.val_sequences=16",
        "sine.test_sequences=16",
        "model.hidden_size=8",
        "train.global_batch_size=16",
        "train.max_steps=2",
        "wandb.mode=disabled",
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_ddp.py"), *args],
        env={**job_env(), "OMP_NUM_THREADS": "2"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "INFO done:" in proc.stdout  # the log, where the warning would be
    assert "not flushed" not in proc.stdout, proc.stdout[:2000]
