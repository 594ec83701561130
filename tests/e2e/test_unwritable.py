"""Places the job cannot write: one line naming the path and the fix, exit 2, nothing lost (train and evaluate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, job_env, run_job

SHORT = ["model.hidden_size=8", "train.max_steps=5", "wandb.mode=offline"]


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    return lines[0]


@pytest.mark.parametrize("blocked", ["run_dir", "checkpoints", "plots"])
def test_an_unwritable_run_directory_is_one_line_and_exit_2(tmp_path: Path, mnist_root, blocked: str):
    # Root ignores permission bits, so each place is made unwritable by a file standing where a folder must go
    # (and /proc, where nothing can be created).
    run = tmp_path / "run"
    if blocked == "run_dir":
        run = Path("/proc/rnnddp-test-run")
        where = run
    else:
        run.mkdir()
        (run / blocked).write_text("a file, not a folder\n")
        where = run / blocked
    line = _one_line(run_job([*SHORT, f"data.root={mnist_root}", f"run_dir={run}", "eval.plots=true"], check=False))
    assert line.startswith(f"error: cannot write in {where} (") and "set run_dir= to a writable folder" in line
    if blocked != "run_dir":
        assert (run / blocked).read_text() == "a file, not a folder\n"  # nothing overwritten
        assert not (run / "metrics.jsonl").exists()


def test_an_unwritable_extraction_cache_is_one_line(tmp_path: Path, mnist_root):
    if list((mnist_root / "MNIST" / "raw").glob("*-ubyte")):
        pytest.skip("this MNIST copy is already uncompressed: nothing to extract")
    args = [*SHORT, f"data.root={mnist_root}", "data.cache_dir=/proc/rnnddp-test-cache", f"run_dir={tmp_path / 'run'}"]
    line = _one_line(run_job(args, check=False))
    assert "/proc/rnnddp-test-cache" in line and "set data.cache_dir to a writable folder" in line


def test_evaluate_with_an_unwritable_plots_folder_is_one_line_unless_told_not_to_draw(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    run_job([*SHORT, "wandb.mode=disabled", f"data.root={mnist_root}", f"run_dir={run}", "eval.plots=true"])
    for p in (run / "plots").iterdir():
        p.unlink()
    (run / "plots").rmdir()
    (run / "plots").write_text("a file, not a folder\n")

    def evaluate(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "rnnddp.evaluate", str(run), f"data.root={mnist_root}", *extra]
        return subprocess.run(cmd, env=job_env(), cwd=REPO, capture_output=True, text=True)

    line = _one_line(evaluate())
    assert line.startswith(f"error: cannot write in {run / 'plots'} (") and "pass --no-plots" in line
    ok = evaluate("--no-plots")
    assert ok.returncode == 0 and "(10000 images)" in ok.stdout, ok.stderr
