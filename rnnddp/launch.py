"""Launching the job as users do: plain python for one process, torchrun for several (the tests and bench use it)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "train_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_command(args: list[str], nproc: int = 1, launcher: list[str] | None = None) -> list[str]:
    """train_ddp.py with ``args``: plain python for one process (no process group), torchrun (loopback) for several."""
    if nproc == 1 and not launcher:
        return [sys.executable, str(ENTRY), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *(launcher or []),
        str(ENTRY),
        *args,
    ]


def job_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """This environment with the repository importable; ``threads`` sets OMP_NUM_THREADS unless already set
    (None: leave it as found, as a user's launch does)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.update(extra)
    return env
