"""SLURM on two real nodes (tests/slurm_hosts.py: slurmctld + a slurmd per network namespace):
`sbatch --nodes=2 slurm/train.sbatch`, preemption and requeue with W&B offline, and a lost node."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rnnddp.wandb_files import history, offline_runs
from tests.conftest import effective_train_steps, final_eval, latest_state, read_metrics
from tests.e2e.test_slurm import Job, _cluster_script, _unavailable
from tests.hosts import available, two_hosts
from tests.slurm_hosts import Cluster, two_node_cluster

pytestmark = pytest.mark.system  # real SLURM daemons or network namespaces: root and system packages

STEPS = 100  # a requeue and an exact resume do not depend on the run's length
ARGS = [
    "--config",
    "configs/seed_lstm.yaml",
    f"train.max_steps={STEPS}",
    "train.log_every_steps=1",
    "checkpoint.every_steps=20",
    "wandb.mode=offline",  # the default without a key
    "eval.batch_size=2000",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = available()
    if reason:
        _unavailable(reason)
    install = _cluster_script("install", dict(os.environ))
    if install.returncode != 0:
        _unavailable(f"slurm/ci_cluster.sh install failed: {install.stderr.strip()[-1500:]}")
    with two_hosts() as (a, b), two_node_cluster(a, b) as c:
        yield c


def _submit(cluster: Cluster, folder: Path, mnist_root: Path, *extra: str) -> Job:
    return Job(cluster.env, folder, mnist_root, [*ARGS, *extra], wrap=cluster.command, sbatch=["--nodes=2"])


@pytest.fixture(scope="module")
def reference(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Job:
    """An uninterrupted 2-node job (2 x 2 ranks)."""
    job = _submit(cluster, tmp_path_factory.mktemp("sbatch2"), mnist_root)
    job.final = job.wait()
    out = job.output()
    assert job.final["JobState"] == "COMPLETED" and job.final["Restarts"] == "0", f"{job.final}\n{out[-3000:]}"
    assert "(2 node(s))" in out and "--nnodes=2" in out
    assert latest_state(job.run_dir)["world_size"] == 4
    return job


def _same_parameters(job: Job, reference: Job) -> None:
    state, ref = latest_state(job.run_dir), latest_state(reference.run_dir)
    assert state["global_step"] == STEPS and state["world_size"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(v, state["model"][k]), f"parameter {k} differs from the uninterrupted 2-node job"


def test_usr1_on_two_nodes_requeues_and_resumes_exactly(cluster: Cluster, tmp_path: Path, mnist_root, reference):
    # Paced (0.2 s a step after step 1, parameters unchanged): the signal travels scancel -> slurmd -> the
    # batch script -> srun -> 4 ranks on 2 nodes, and must land before the 100-step run ends on a fast machine.
    job = _submit(cluster, tmp_path, mnist_root, "debug.step_delay_s=0.2")
    job.wait_for_wandb()
    job.wait_for_step(20)
    job.signal("USR1")
    final = job.wait()
    out = job.output()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{out[-3000:]}"
    assert final["Restarts"] == "1", final
    assert "requeueing job" in out and "stopped on SIGTERM" in out, out[-3000:]
    assert effective_train_steps(job.run_dir) == list(range(1, STEPS + 1))
    files = offline_runs(job.run_dir)
    assert len(files) == 2 and sorted(int(r["_step"]) for f in files for r in history(f)) == list(range(1, STEPS + 1))
    _same_parameters(job, reference)


def test_a_lost_node_is_requeued_and_the_job_finishes(cluster: Cluster, tmp_path: Path, mnist_root, reference):
    """SIGKILL every process of the job on node 2 (as an OOM kill or a crash there would; its slurmd
    stays): node 1's ranks notice, note it and exit 75; the script requeues; the rerun finishes."""
    job = _submit(cluster, tmp_path, mnist_root)
    job.wait_for_step(30)
    victims = cluster.job_processes(cluster.hosts[1], job.id)
    assert victims, "no process of the job on node 2"
    killed = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    final = job.wait()
    out = job.output()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", f"{final}\n{out[-3000:]}"
    assert "a node was lost mid-run; requeueing" in out, out[-3000:]
    metrics = read_metrics(job.run_dir)
    lost = [m for m in metrics if m.get("event") == "lost_peer"]
    resume = [m for m in metrics if m.get("event") == "resume"]
    assert {m["rank"] for m in lost} == {0, 1} and len(resume) == 1, (lost, resume)
    noticed = min(m["time"] for m in lost) - killed
    print(
        f"node 2 killed at step {lost[0]['step']}: node 1 noticed {noticed:.1f} s later; requeued, resumed at "
        f"step {resume[0]['step']} ({lost[0]['step'] - resume[0]['step']} step(s) redone)"
    )
    assert lost[0]["step"] - resume[0]["step"] <= 20
    assert effective_train_steps(job.run_dir) == list(range(1, STEPS + 1))
    assert final_eval(job.run_dir)["step"] == STEPS
    _same_parameters(job, reference)  # a kill and a resume on the same 4 ranks: bit for bit
