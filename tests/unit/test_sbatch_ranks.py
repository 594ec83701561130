"""slurm/train.sbatch's choice of ranks and threads per node, and its global-batch check, without SLURM.

The script runs under bash with the SLURM_* variables a job would have and a PATH whose ``srun`` and
``scontrol`` are stubs that record their arguments (and the OMP_NUM_THREADS that srun would hand on):
what is tested is the script's own arithmetic; tests/e2e/test_slurm.py runs it on a real cluster.
PYTHON is a stub too, except where the real global-batch check runs (train_ddp.py --check-world-size).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SBATCH = REPO / "slurm" / "train.sbatch"

STUBS = {
    # srun: the arguments one per line, then the thread count the tasks (torchrun, its workers) inherit.
    "srun": '#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_LOG/srun"\necho "OMP_NUM_THREADS=${OMP_NUM_THREADS-unset}" '
    '>> "$STUB_LOG/srun"\n',
    "scontrol": '#!/bin/bash\nfor ((i = 1; i <= SLURM_NNODES; i++)); do echo "node$i"; done\n',
    # PYTHON: records each call (the batch check, then srun's command line names it) and passes.
    "python-stub": '#!/bin/bash\nprintf "%s\\n" "$*" >> "$STUB_LOG/python"\n',
}


def _sbatch(
    tmp_path: Path, cpus: int, nodes: int = 1, args: list[str] = (), python: str | None = None, **env: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run train.sbatch as SLURM would on a node with ``cpus`` CPUs; what srun and PYTHON were given."""
    stubs, log = tmp_path / "bin", tmp_path / "log"
    stubs.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    full = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": f"node[1-{nodes}]",
        "SLURM_NNODES": str(nodes),
        "SLURM_CPUS_ON_NODE": str(cpus),
        "SLURM_SUBMIT_DIR": str(REPO),
        "RUNS_DIR": str(tmp_path / "runs"),
        "PYTHON": python or str(stubs / "python-stub"),
        **env,
    }
    proc = subprocess.run(["bash", str(SBATCH), *args], env=full, capture_output=True, text=True, timeout=60)
    srun = (log / "srun").read_text().splitlines() if (log / "srun").is_file() else None
    python_calls = (log / "python").read_text().splitlines() if (log / "python").is_file() else []
    return proc, {"srun": srun, "python": python_calls}


def _layout(srun: list[str]) -> tuple[int, str]:
    """(ranks per node, threads per rank: OMP_NUM_THREADS as srun's tasks get it) from the recorded srun call."""
    nproc = [a.split("=", 1)[1] for a in srun if a.startswith("--nproc_per_node=")]
    threads = [a.split("=", 1)[1] for a in srun if a.startswith("OMP_NUM_THREADS=")]
    assert len(nproc) == 1 and len(threads) == 1, srun
    return int(nproc[0]), threads[0]


@pytest.mark.parametrize(
    ("cpus", "nodes", "env", "expected"),
    [
        (48, 1, {}, (4, 12)),  # was 24 ranks: 128 % 24 != 0, the job failed
        (64, 2, {}, (4, 16)),  # was 32 ranks of 4 samples each per node
        (2, 1, {}, (2, 1)),
        (3, 1, {}, (2, 1)),
        (1, 1, {}, (1, 1)),
        (64, 1, {"SLURM_GPUS_ON_NODE": "4"}, (4, 16)),  # one rank per GPU
        (48, 2, {"SLURM_GPUS_ON_NODE": "8"}, (8, 6)),
        (48, 1, {"NPROC_PER_NODE": "2"}, (2, 24)),  # overrides
        (48, 1, {"NPROC_PER_NODE": "16", "SLURM_GPUS_ON_NODE": "4"}, (16, 3)),
        (48, 1, {"THREADS_PER_RANK": "3"}, (4, 3)),
        (48, 1, {"OMP_NUM_THREADS": "5"}, (4, 5)),  # one set by the user is kept
        (48, 1, {"OMP_NUM_THREADS": "5", "THREADS_PER_RANK": "6"}, (4, 6)),
    ],
)
def test_ranks_and_threads_per_node(tmp_path: Path, cpus: int, nodes: int, env: dict, expected: tuple) -> None:
    proc, calls = _sbatch(tmp_path, cpus, nodes, ["train.epochs=1"], **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _layout(calls["srun"]) == (expected[0], str(expected[1]))
    ranks = expected[0]
    assert f"--nnodes={nodes}" in calls["srun"]
    # The batch check ran first, on the same layout and arguments as the job.
    assert calls["python"][0] == f"train_ddp.py --check-world-size {nodes}x{ranks} train.epochs=1", calls["python"]
    assert f"{ranks} rank(s) per node x {expected[1]} thread(s)" in proc.stdout


def test_an_indivisible_global_batch_stops_before_srun_with_one_line(tmp_path: Path) -> None:
    """The real check (train_ddp.py --check-world-size, the config resolved as the job does): 2 nodes x 12
    ranks cannot split 128; exit 2, one line naming both numbers and the fix, srun never called."""
    proc, calls = _sbatch(tmp_path, 48, 2, python=sys.executable, NPROC_PER_NODE="12")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert calls["srun"] is None, "srun was called"
    assert proc.stderr.strip().splitlines() == [
        "error: train.global_batch_size=128 is not divisible by 24 ranks (2 nodes x 12); "
        "set train.global_batch_size to a multiple of 24 or NPROC_PER_NODE=8"
    ], proc.stderr


def test_the_world_size_check_names_the_numbers_and_a_fix(capsys: pytest.CaptureFixture) -> None:
    """train_ddp.py --check-world-size in this process: each case's exit code and one line."""
    import train_ddp

    cases = {
        ("1x4",): (0, ""),
        ("2x4", "--config", "configs/seed_lstm.yaml"): (0, ""),  # 64 over 8
        ("1x24",): (
            2,
            "by 24 ranks (1 node x 24); set train.global_batch_size to a multiple of 24 or NPROC_PER_NODE=16",
        ),
        ("3x2",): (2, "by 6 ranks (3 nodes x 2); set train.global_batch_size to a multiple of 6 (no NPROC_PER_NODE"),
        ("2x3", "train.global_batch_size=96"): (0, ""),
        ("24",): (2, "by 24 ranks; set train.global_batch_size to a multiple of 24"),
        ("2xfour",): (2, "give NODESxPER_NODE"),
        ("1x4", "train.global_batch_sise=64"): (2, "unknown config key 'train.global_batch_sise'"),
    }
    old = os.getcwd()
    os.chdir(REPO)
    try:
        for (spec, *args), (code, words) in cases.items():
            assert train_ddp.main(["--check-world-size", spec, *args]) == code, (spec, args)
            err = capsys.readouterr().err
            assert (
                (err == "") if code == 0 else (err.startswith("error: ") and words in err and err.count("\n") == 1)
            ), (
                spec,
                err,
            )
    finally:
        os.chdir(old)
