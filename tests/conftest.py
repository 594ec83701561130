"""Shared helpers: where the real MNIST lives, and how to launch the real job (python or torchrun)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnddp import launch
from rnnddp.launch import REPO, free_port  # noqa: F401  (tests import them from here)
from rnnddp.metrics import VOIDING_EVENTS

# A suite started in the background (nohup, `cmd &` in a script, some CI runners) inherits SIGINT ignored,
# and so would every job it starts: the tests that send Ctrl-C need the handler a terminal user has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The real MNIST: RNNDDP_TEST_DATA, else the shared copy beside the checkout (read-only in CI).
DATA_ROOT = Path(os.environ.get("RNNDDP_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Two workers (pytest-xdist, ``-n 2 --dist loadgroup`` in pyproject.toml): half the suite's time is
    waiting (process start-up, SLURM's scheduler, peer timeouts), so a second test runs beside it. Each
    end-to-end module stays on one worker (its module fixtures train once); the ``system`` tests form one
    group, run one after another (one SLURM cluster, one set of namespaces at a time), beside the
    CPU-bound rest."""
    for item in items:
        if "/unit/" in item.nodeid:
            item.add_marker(pytest.mark.quick)  # the quick tier: every unit test and the core e2e checks
        if item.get_closest_marker("system"):
            item.add_marker(pytest.mark.xdist_group("system"))
        elif "/e2e/" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    # Longest first, so that no long test starts last (xdist runs the groups in this order with
    # --no-loadscope-reorder): the system group, the e2e modules that train to a bar or run many jobs
    # (slow), the other e2e modules, then the unit tests, which fill the gaps at the end.
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("system"):
            return 0
        if "/e2e/" in item.nodeid:
            return 1 if item.get_closest_marker("slow") else 2
        return 3

    items.sort(key=rank)  # stable: file order within each rank


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        if os.environ.get("RNNDDP_REQUIRE_DATA"):  # CI: missing data is a failure, not a skip
            pytest.fail(f"real MNIST not found under {DATA_ROOT}")
        pytest.skip(f"real MNIST not found under {DATA_ROOT} (set RNNDDP_TEST_DATA to a folder holding MNIST/raw)")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # One extraction cache per test session, never the user's ~/.cache; W&B never phones home.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def job_env() -> dict[str, str]:
    env = launch.job_env(threads=1)
    # A W&B run in this process (the in-process jobs of the journeys, the resume edges) exports its service's
    # address for child processes; a launched job must start its own, as a user's does, not write through ours.
    env.pop("WANDB_SERVICE", None)
    return env


def job_cmd(args: list[str], nproc: int = 1, launcher: list[str] | None = None) -> list[str]:
    """train_ddp.py for real: plain python for one process, torchrun (gloo) for several. The final test's
    pictures are drawn only where a test says ``eval.plots=true`` (the tests that look at them): about 2 s
    at the end of every finished run otherwise."""
    if not any(a.startswith("eval.plots=") for a in args):
        args = [*args, "eval.plots=false"]
    return launch.job_command(args, nproc, launcher)


def run_job(
    args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    cmd = job_cmd(args, nproc, launcher)
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if check:
        assert_clean_exit(proc.stdout + proc.stderr)
    return proc


def assert_clean_exit(output: str) -> None:
    """A job that exited 0 left cleanly: no rank aborted in its teardown (a C++ ``terminate called`` from a
    process group torn down under a thread) and no traceback. Every finished job of the suite is held to it."""
    for sign in ("terminate called", "Traceback"):
        assert sign not in output, f"a finished job printed {sign!r}:\n{output[-3000:]}"


def run_cli(module: str, *args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module args...`` (rnnddp.evaluate, rnnddp.predict, rnnddp.prepare), output captured."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def worker_exit_codes(output: str) -> list[int]:
    """The workers' exit statuses in torchrun's failure report (its ``exitcode  : N`` lines), one per failed rank."""
    return sorted(int(code) for code in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", output, re.MULTILINE))


def in_process_trainer(mnist_root: Path, run_dir: Path, overrides: list[str], device: str = "cpu"):
    """A single-process Trainer built as the job builds it (rnnddp.job.build_trainer), in this process."""
    from rnnddp.checkpoint import CheckpointManager
    from rnnddp.config import load_config
    from rnnddp.dist import DistInfo
    from rnnddp.job import build_trainer

    cfg = load_config([f"data.root={mnist_root}", "wandb.mode=disabled", f"run_dir={run_dir}", *overrides])
    built = build_trainer(cfg, DistInfo(device=torch.device(device)), CheckpointManager(run_dir, writer=False))
    built.trainer.module.train()
    return built.trainer


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_eval(run_dir: Path, metric: str = "accuracy") -> dict:
    """The test record of the final model (the job writes it once, after training), with the record's keys
    ``step``, ``test/loss`` and ``test/<metric>``."""
    found = [m for m in read_metrics(run_dir) if f"test/{metric}" in m]
    assert len(found) == 1, f"expected one test record in {run_dir}/metrics.jsonl, found {len(found)}"
    return found[0]


def val_records(run_dir: Path, metric: str = "accuracy") -> list[dict]:
    return [m for m in read_metrics(run_dir) if f"val/{metric}" in m]


def latest_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    return torch.load(ckpt / (ckpt / "latest").read_text().strip(), weights_only=True)


def effective_train_steps(run_dir: Path) -> list[int]:
    """Train-log steps that count toward the final model: a resume at step N voids later records."""
    steps: list[int] = []
    for m in read_metrics(run_dir):
        if m.get("event") in VOIDING_EVENTS:
            steps = [s for s in steps if s <= m["step"]]
        elif "train/loss" in m:
            steps.append(m["step"])
    return steps
