"""Shared helpers: where the real MNIST lives, and how to launch the real job (python or torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The real MNIST: RNNDDP_TEST_DATA, else the shared copy beside the checkout (read-only in CI).
DATA_ROOT = Path(os.environ.get("RNNDDP_TEST_DATA", REPO.parent / "shared" / "data"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def job_cmd(args: list[str], nproc: int = 1, launcher: list[str] | None = None) -> list[str]:
    """train_ddp.py for real: plain python for one process, torchrun (gloo) for several."""
    if nproc == 1 and not launcher:
        return [sys.executable, str(REPO / "train_ddp.py"), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *(launcher or []),
        str(REPO / "train_ddp.py"),
        *args,
    ]


def run_job(
    args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    cmd = job_cmd(args, nproc, launcher)
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def in_process_trainer(mnist_root: Path, run_dir: Path, overrides: list[str], device: str = "cpu"):
    """A single-process Trainer built as the job builds it (rnnddp.job.build_trainer), in this process."""
    from rnnddp.checkpoint import CheckpointManager
    from rnnddp.config import load_config
    from rnnddp.data import load_mnist, locate_mnist
    from rnnddp.dist import DistInfo
    from rnnddp.job import build_trainer

    cfg = load_config([f"data.root={mnist_root}", "wandb.mode=disabled", f"run_dir={run_dir}", *overrides])
    data = load_mnist(locate_mnist(str(mnist_root), download=False))
    info = DistInfo(device=torch.device(device))
    trainer = build_trainer(cfg, info, *data, CheckpointManager(run_dir, writer=False))
    trainer.module.train()
    return trainer


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_eval(run_dir: Path) -> dict:
    return [m for m in read_metrics(run_dir) if "eval/accuracy" in m][-1]


def latest_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    return torch.load(ckpt / (ckpt / "latest").read_text().strip(), weights_only=True)


def effective_train_steps(run_dir: Path) -> list[int]:
    """Train-log steps that count toward the final model: a resume at step N voids later records."""
    steps: list[int] = []
    for m in read_metrics(run_dir):
        if m.get("event") == "resume":
            steps = [s for s in steps if s <= m["step"]]
        elif "train/loss" in m:
            steps.append(m["step"])
    return steps
