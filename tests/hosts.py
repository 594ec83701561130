"""Two real hosts on one machine: network namespaces joined by a veth pair.

Each host has its own network stack (interfaces, addresses, ports, loopback), as two machines on
one link would; the file system and processes are shared, as a shared home folder would be. Only
the addresses and names made here are used, and everything is removed in ``finally``. Needs root
and ``ip``; :func:`two_hosts` skips the test otherwise.

    with two_hosts() as (a, b):
        proc = a.popen([...])          # runs inside host A's namespace
        b.link_down()                  # cut the cable on B's side
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, job_env


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def available() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def torchrun_cmd(
    endpoint: str, rdzv_id: str, args: list[str], nnodes: int | str = 2, nproc: int = 2, launcher: list[str] = ()
) -> list[str]:
    """What each node runs (what slurm/train.sbatch runs under srun): torchrun with a c10d rendezvous."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
        *launcher,
        str(REPO / "train_ddp.py"),
        *args,
    ]


@dataclass
class Host:
    name: str  # the network namespace
    addr: str  # its address on the link
    ifname: str  # its end of the veth pair (GLOO_SOCKET_IFNAME)

    def command(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(cmd), **kwargs)

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process on this host, as a power loss would (repeats: a dying process can fork)."""
        killed: list[int] = []
        for _ in range(20):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed += pids
            time.sleep(0.05)
        return killed

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the training processes on this host (their RANK, read from /proc); not their
        children (W&B's service inherits RANK)."""
        found = {}
        for pid in self.pids():
            try:
                if b"train_ddp.py" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            values = dict(kv.decode(errors="replace").split("=", 1) for kv in env if b"=" in kv)
            if "RANK" in values and "TORCHELASTIC_RUN_ID" in values:
                found[int(values["RANK"])] = pid
        return found

    def link_down(self) -> None:
        _ip("-n", self.name, "link", "set", self.ifname, "down")


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    reason = available()
    if reason:
        if os.environ.get("RNNDDP_REQUIRE_HOSTS"):  # CI runs as root: a missing harness is a failure
            pytest.fail(f"two-host tests cannot run: {reason}")
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    a = Host(f"rnnddp-{tag}-a", f"{subnet}.1", f"rv{tag}a")
    b = Host(f"rnnddp-{tag}-b", f"{subnet}.2", f"rv{tag}b")
    made: list[str] = []
    try:
        for host in (a, b):
            _ip("netns", "add", host.name)
            made.append(host.name)
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for host in (a, b):
            _ip("link", "set", host.ifname, "netns", host.name)
            _ip("-n", host.name, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _ip("-n", host.name, "link", "set", host.ifname, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        yield a, b
    finally:
        for name in made:
            host = a if name == a.name else b
            host.kill_everything()  # nothing of a test outlives its hosts
            # Deleting a namespace removes its end of the veth pair, and with it the other end.
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def host_cmd(host: Host, head: Host, rdzv_id: str, args: list[str], rdzv_conf: str = "", **kwargs: Any) -> list[str]:
    """torchrun on ``host`` with the rendezvous on ``head``; --local-addr because both namespaces share
    one hostname, which would name an address of neither (a multi-homed node needs it too)."""
    # is_host: torchrun hosts the rendezvous store when the endpoint names its own hostname, and an
    # address of a namespace is not one, so say which host holds it.
    conf = ",".join(c for c in (f"is_host={int(host is head)}", rdzv_conf) if c)
    launcher = [f"--local-addr={host.addr}", f"--rdzv-conf={conf}", *kwargs.pop("launcher", [])]
    return torchrun_cmd(f"{head.addr}:29400", rdzv_id, args, launcher=launcher, **kwargs)


def host_env(host: Host, **extra: str) -> dict[str, str]:
    return {**job_env(), "GLOO_SOCKET_IFNAME": host.ifname, **extra}


def start_hosts(hosts: list[Host], args: list[str], logs: Path, **kwargs: Any) -> list[subprocess.Popen]:
    """One torchrun per host (host 0 holds the rendezvous), output in ``logs/<host>.log``."""
    rdzv_id = uuid.uuid4().hex[:8]
    procs = []
    logs.mkdir(parents=True, exist_ok=True)
    for host in hosts:
        with (logs / f"{host.name}.log").open("w") as out:
            cmd = host_cmd(host, hosts[0], rdzv_id, args, **dict(kwargs))
            procs.append(host.popen(cmd, env=host_env(host), cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; on a timeout SIGTERM (torchrun takes its workers down), then SIGKILL."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def read(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""
