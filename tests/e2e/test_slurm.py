"""SLURM for real: a one-node cluster (slurm/ci_cluster.sh), slurm/train.sbatch end to end, preemption + requeue.

The cluster: this module installs the packages if missing (root only), starts its own one-node
cluster with `slurm/ci_cluster.sh start` in a temporary folder on free ports, and stops it by PID
at the end. To use one that is already running instead (say, `eval "$(bash slurm/ci_cluster.sh
start)"`), export RNNDDP_SLURM_CONF=<its slurm.conf>; it is left running. A SLURM_CONF of a login
node is deliberately not picked up: these jobs write to /tmp and must not go to a real queue.
Without root or packages the tests skip with the reason; with RNNDDP_REQUIRE_SLURM=1 (CI) they
fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from rnnddp.wandb_files import history, offline_runs
from tests.conftest import REPO, effective_train_steps, final_eval, free_port, job_env, latest_state, read_metrics

pytestmark = pytest.mark.system  # real SLURM daemons or network namespaces: root and system packages

SLURM_DIR = REPO / "slurm"
CLUSTER = SLURM_DIR / "ci_cluster.sh"
SBATCH = SLURM_DIR / "train.sbatch"
SCRIPTS = sorted([*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("*.sbatch")])

STEPS = 400
# The seed config (LSTM-64, batch 64, Adam 0.01, cosine) cut to 400 steps: about 0.92 test
# accuracy after 7 s of training on 2 CPU ranks; 0.85 leaves room for platform noise.
ACCURACY_BAR = 0.85
ARGS = [
    "--config",
    "configs/seed_lstm.yaml",
    f"train.max_steps={STEPS}",
    "train.log_every_steps=1",  # every step appears in metrics.jsonl: none lost, none twice
    "wandb.mode=offline",  # the default without a key: W&B must not break preemption
    "eval.batch_size=2000",
]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("RNNDDP_REQUIRE_SLURM") == "1":
        pytest.fail(f"RNNDDP_REQUIRE_SLURM=1 but no SLURM cluster: {reason}")
    pytest.skip(f"no SLURM cluster: {reason}")


def _sinfo_ok(conf: str) -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"],
            env={**os.environ, "SLURM_CONF": conf},
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "allocated"))


def _cluster_script(cmd: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", str(CLUSTER), cmd], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([cmd], 124, "", f"slurm/ci_cluster.sh {cmd} timed out after {timeout}s")


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """Environment entries that point sbatch/squeue/scontrol at a running one-node cluster."""
    existing = os.environ.get("RNNDDP_SLURM_CONF")
    if existing:
        if not _sinfo_ok(existing):
            _unavailable(f"RNNDDP_SLURM_CONF={existing}: that cluster does not answer sinfo")
        yield {"SLURM_CONF": existing}  # not ours: left running
        return
    if os.geteuid() != 0:
        _unavailable("starting munged and slurmd needs root (or start one and export RNNDDP_SLURM_CONF)")
    install = _cluster_script("install", dict(os.environ))
    if install.returncode != 0:
        _unavailable(f"slurm/ci_cluster.sh install failed: {install.stderr.strip()[-1500:]}")
    state = Path(tempfile.mkdtemp(prefix="rnnddp-slurm-"))  # short: slurmd puts sockets under it
    ctld_port = free_port()
    slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    env = {
        **os.environ,
        "RNNDDP_SLURM_DIR": str(state),
        "SLURM_CI_CTLD_PORT": str(ctld_port),  # free ports: never collides with another cluster here
        "SLURM_CI_SLURMD_PORT": str(slurmd_port),
    }
    start = _cluster_script("start", env)
    try:
        if start.returncode != 0:
            _unavailable(f"slurm/ci_cluster.sh start failed: {start.stderr.strip()[-1500:]}")
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        _cluster_script("stop", env, timeout=120)  # kills only the PIDs that start recorded
        shutil.rmtree(state, ignore_errors=True)


def _job_info(env: dict[str, str], job_id: str, wrap: Callable[[list[str]], list[str]]) -> dict[str, str]:
    proc = subprocess.run(wrap(["scontrol", "show", "job", "-o", job_id]), env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


class Job:
    """One submission of slurm/train.sbatch: its id, output file and (job-id-derived) run_dir.

    ``wrap``: how a client command (sbatch, scontrol, scancel) reaches the cluster (default: as is)."""

    def __init__(
        self,
        slurm_env: dict[str, str],
        folder: Path,
        mnist_root: Path,
        args: list[str],
        wrap: Callable[[list[str]], list[str]] = list,
        sbatch: list[str] = (),
    ) -> None:
        self.wrap = wrap
        self.env = {
            **job_env(),
            **slurm_env,
            # What a user sets on a CPU node; sbatch --export=ALL (the default) hands it all on.
            "NPROC_PER_NODE": "2",
            "PYTHON": sys.executable,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "RUNS_DIR": str(folder),
            "RDZV_PORT": str(free_port()),
            # One extraction cache per test session (module fixtures start before conftest's autouse one).
            "XDG_CACHE_HOME": str(folder.parent.parent / "cache"),
            "WANDB_MODE": "offline",
        }
        proc = subprocess.run(
            wrap(["sbatch", "--parsable", "--export=ALL", *sbatch, f"--output={folder}/%x-%j.out", str(SBATCH)])
            + [*args, f"data.root={mnist_root}"],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]
        self.final: dict[str, str] = {}  # scontrol's fields once the job has ended
        self.log = folder / f"rnnddp-{self.id}.out"
        self.run_dir = folder / f"slurm-{self.id}"  # RUNS_DIR/slurm-<jobid>: stable across requeues

    def info(self) -> dict[str, str]:
        return _job_info(self.env, self.id, self.wrap)

    def wait_for_wandb(self, timeout: float = 60) -> None:
        """A preemption comes long after W&B is up (it starts in the background): wait for that too."""
        deadline = time.time() + timeout
        while "INFO wandb: offline run" not in self.output():
            assert time.time() < deadline, f"W&B did not start\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def signal(self, name: str) -> None:
        """What --signal=B:<name>@lead does before the time limit, sent now, to the batch script."""
        cmd = self.wrap(["scancel", f"--signal={name}", "--batch", self.id])
        subprocess.run(cmd, env=self.env, check=True, timeout=30)

    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else "(no output file)"

    def wait(self, timeout: float = 300) -> dict[str, str]:
        """Poll scontrol until the job reaches a final state (a requeued job passes through PENDING)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(0.5)
        subprocess.run(self.wrap(["scancel", self.id]), env=self.env)
        raise AssertionError(f"job {self.id} not finished in {timeout}s ({self.info()})\n{self.output()[-3000:]}")

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.info().get("JobState")
            if state in TERMINAL:
                raise AssertionError(f"job {self.id} ended ({state}) before step {step}\n{self.output()[-3000:]}")
            try:
                steps = [m["step"] for m in read_metrics(self.run_dir) if "train/loss" in m]
            except (FileNotFoundError, ValueError):
                steps = []
            if steps and steps[-1] >= step:
                return
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached in {timeout}s\n{self.output()[-3000:]}")


@pytest.fixture(scope="module")
def finished_job(slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Job:
    """An uninterrupted 1-node, 2-rank sbatch run; also the reference for the requeued one."""
    job = Job(slurm_env, tmp_path_factory.mktemp("sbatch"), mnist_root, ARGS)
    job.final = job.wait()
    return job


def test_sbatch_trains_on_one_node_to_the_accuracy_bar(finished_job: Job) -> None:
    job, out = finished_job, finished_job.output()
    assert job.final["JobState"] == "COMPLETED" and job.final["ExitCode"] == "0:0", f"{job.final}\n{out[-3000:]}"
    assert job.final["Restarts"] == "0"
    assert "SLURM_RESTART_COUNT=0" in out
    assert "--nproc_per_node=2" in out and "--rdzv_backend=c10d" in out and f"--rdzv_id={job.id}" in out
    assert "requeueing" not in out
    assert job.run_dir.is_dir(), f"no run_dir {job.run_dir} derived from the job id\n{out[-3000:]}"
    state = latest_state(job.run_dir)
    assert state["global_step"] == STEPS and state["world_size"] == 2
    assert effective_train_steps(job.run_dir) == list(range(1, STEPS + 1))
    accuracy = final_eval(job.run_dir)["test/accuracy"]
    assert accuracy > ACCURACY_BAR, f"test accuracy {accuracy} <= {ACCURACY_BAR}"


def test_usr1_checkpoints_requeues_and_the_second_run_resumes_exactly(
    slurm_env: dict[str, str], tmp_path: Path, mnist_root: Path, finished_job: Job
) -> None:
    job = Job(slurm_env, tmp_path, mnist_root, ARGS)
    job.wait_for_step(30)
    job.wait_for_wandb()
    # What --signal=B:USR1@lead does before the time limit, sent now.
    job.signal("USR1")
    final = job.wait()
    out = job.output()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{out[-3000:]}"
    assert final["Restarts"] == "1", final
    assert "SLURM_RESTART_COUNT=0" in out and "SLURM_RESTART_COUNT=1" in out, out[-3000:]  # one file (append)
    assert "requeueing job" in out and "stopped on SIGTERM" in out, out[-3000:]

    metrics = read_metrics(job.run_dir)
    stopped = [m for m in metrics if m.get("event") == "stopped"]
    resumed = [m for m in metrics if m.get("event") == "resume"]
    assert len(stopped) == 1 and 30 <= stopped[0]["step"] < STEPS, stopped
    assert len(resumed) == 1 and resumed[0]["step"] == stopped[0]["step"], resumed
    # Total optimiser steps equal an uninterrupted run's: 1..STEPS, each once.
    assert effective_train_steps(job.run_dir) == list(range(1, STEPS + 1))
    # W&B (offline, as without a key) survived the step's signal: one run id over both sessions, each step once.
    files = offline_runs(job.run_dir)
    assert len(files) == 2 and len({f.name for f in files}) == 1, files
    assert [int(r["_step"]) for f in files for r in history(f)] == list(range(1, STEPS + 1))
    # And the same parameters, bit for bit, as the uninterrupted job (CPU, same 2 ranks).
    state, reference = latest_state(job.run_dir), latest_state(finished_job.run_dir)
    assert state["global_step"] == STEPS
    for k, v in reference["model"].items():
        assert torch.equal(v, state["model"][k]), f"parameter {k} differs from the uninterrupted run"
    assert final_eval(job.run_dir)["test/accuracy"] == final_eval(finished_job.run_dir)["test/accuracy"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scripts_pass_shellcheck() -> None:
    if not shutil.which("shellcheck") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "shellcheck"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=300,
        )
    if not shutil.which("shellcheck"):
        _unavailable("shellcheck is not installed and could not be (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
