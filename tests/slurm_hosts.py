"""A real two-node SLURM cluster on the two hosts of tests/hosts.py: slurmctld and one slurmd on
host A, one slurmd on host B, each node with its own hostname (a UTS namespace), address and port
space. A hosts file of the cluster's own is mounted over /etc/hosts in each node's mount namespace,
so jobs, torchrun and gloo find the nodes by name as on a real cluster. (Not `ip netns exec`: it
mounts a fresh /sys, without the cgroup file systems slurmd needs.) Client commands (sbatch,
scontrol, ...) run on host A: ``cluster.run([...])``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.hosts import Host

NODES = ("rnnddp1", "rnnddp2")  # hostnames of host A and host B inside their namespaces


@dataclass
class Cluster:
    hosts: tuple[Host, Host]
    state: Path
    env: dict[str, str] = field(default_factory=dict)  # SLURM_CONF for clients

    def command(self, cmd: list[str], node: int = 0) -> list[str]:
        """``cmd`` as run on node ``node`` (0: host A), under its node name and with the cluster's hosts file."""
        host, name = self.hosts[node], NODES[node]
        setup = f'mount --bind {self.state}/hosts /etc/hosts && hostname {name} && exec "$@"'
        return [
            "nsenter", f"--net=/run/netns/{host.name}",
            "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", setup, "-", *cmd,
        ]  # fmt: skip

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), env={**os.environ, **self.env, **kwargs.pop("env", {})}, **kwargs)

    def job_processes(self, host: Host, job_id: str) -> list[int]:
        """The processes of job ``job_id`` on ``host`` (by SLURM_JOB_ID in their environment); slurmd stays."""
        found = []
        for pid in host.pids():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if re.search(rb"(^|\0)SLURM_JOB_ID=" + job_id.encode() + rb"\0", env):
                found.append(pid)
        return found


def _conf(state: Path, a: Host, b: Host) -> str:
    return f"""ClusterName=ci2
SlurmctldHost={NODES[0]}({a.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
NodeName={NODES[0]} NodeAddr={a.addr} CPUs=2 State=UNKNOWN
NodeName={NODES[1]} NodeAddr={b.addr} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={NODES[0]},{NODES[1]} Default=YES MaxTime=INFINITE State=UP
"""


def _munge_ok() -> bool:
    proc = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
    return proc.returncode == 0


def _read_pid(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
            return pid
        time.sleep(0.1)
    raise RuntimeError(f"no live daemon behind {path}")


@contextlib.contextmanager
def two_node_cluster(a: Host, b: Host) -> Iterator[Cluster]:
    """Start the cluster (root; slurm and munge installed: slurm/ci_cluster.sh install); stop it after."""
    state = Path(tempfile.mkdtemp(prefix="rnnddp-s2-"))  # short: slurmd puts sockets under it
    daemons: list[int] = []
    cluster = Cluster((a, b), state, {"SLURM_CONF": str(state / "slurm.conf")})
    try:
        (state / "hosts").write_text(f"127.0.0.1 localhost\n{a.addr} {NODES[0]}\n{b.addr} {NODES[1]}\n")
        for sub in ("ctld", *(f"d-{n}" for n in NODES)):
            (state / sub).mkdir()
        (state / "slurm.conf").write_text(_conf(state, a, b))
        if not _munge_ok():
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "--create"], check=True)
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)
            daemons.append(_read_pid(Path("/run/munge/munged.pid")))
        env = {**os.environ, **cluster.env}
        for node, start in ((0, "slurmctld -c && slurmd"), (1, "slurmd")):
            subprocess.run(cluster.command(["sh", "-c", start], node), env=env, check=True, timeout=60)
        daemons += [_read_pid(state / "slurmctld.pid")] + [_read_pid(state / f"slurmd-{n}.pid") for n in NODES]
        deadline = time.monotonic() + 60
        while True:
            out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True).stdout
            if out.split().count("idle") == 2:
                break
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in state.glob("*.log"))
                raise RuntimeError(f"two-node cluster not idle after 60 s (sinfo: {out!r})\n{logs}")
            time.sleep(0.3)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.run(["scancel", "--partition=debug"], capture_output=True, timeout=30)
        for pid in reversed(daemons):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in daemons:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)
