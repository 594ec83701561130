"""Multi-node without SLURM: two torchrun "nodes" on loopback form one 4-rank gloo job (c10d rendezvous)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import torch

from rnnddp.models import build_model
from tests.conftest import REPO, free_port, job_env, latest_state, run_job
from tests.hosts import torchrun_cmd, wait_all

# The same optimisation on 4 ranks (2 nodes x 2) and on 1 process: global batch 64 either way.
ARGS = [
    "model.hidden_size=32",
    "train.global_batch_size=64",
    "train.max_steps=20",
    "optim.lr=0.01",
    "sched.name=cosine",
    "wandb.mode=disabled",
    "eval.batch_size=2000",
]


def test_two_nodes_on_loopback_match_one_process(tmp_path: Path, mnist_root: Path) -> None:
    args = [*ARGS, f"data.root={mnist_root}"]
    multi = tmp_path / "two_nodes"
    cmd = torchrun_cmd(f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8], [*args, f"run_dir={multi}"])
    # Both launchers name the same endpoint: the first to bind it hosts the store, the other joins.
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = []
    for log in logs:
        with log.open("w") as out:  # a file, not a pipe: one node's full pipe cannot stall the other
            nodes.append(subprocess.Popen(cmd, env=job_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    wait_all(nodes, timeout=300)  # on a timeout: SIGTERM lets torchrun take its workers down with it
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log.read_text()[-3000:]

    run_job([*args, f"run_dir={tmp_path}/one"], nproc=1)
    one, four = latest_state(tmp_path / "one"), latest_state(multi)
    assert one["global_step"] == four["global_step"] == 20
    assert four["world_size"] == 4 and len(four["rng"]) == 4
    worst = max((one["model"][k] - four["model"][k]).abs().max().item() for k in one["model"])
    assert worst <= 1e-5, f"max parameter difference {worst} between 2x2 ranks and 1 process"
    # The parameters did move: the comparison is not between two initialisations.
    torch.manual_seed(0)
    init = build_model(one["model_args"]).state_dict()
    assert max((one["model"][k] - v).abs().max().item() for k, v in init.items()) > 1e-3


def test_ranks_that_see_different_checkpoints_stop_naming_the_rank_and_the_file(tmp_path: Path) -> None:
    """Node-local run directories: each "node" holds a valid newest checkpoint of the same name but other
    bytes. Rank 0 picks, the other rank finds other bytes: exit 2 with one line, nothing trained."""
    import shutil

    from rnnddp.checkpoint import CheckpointManager
    from tests.conftest import worker_exit_codes
    from tests.sequence_files import tiny_prepared

    data = tiny_prepared(tmp_path)
    common = [
        "task=sequence_classification",
        f"sequences.path={data}",
        "train.global_batch_size=8",
        "model.hidden_size=8",
        "wandb.mode=disabled",
    ]
    a, b = tmp_path / "node_a", tmp_path / "node_b"
    run_job([*common, f"run_dir={a}", "debug.stop_at_step=4"], check=False)
    shutil.copytree(a, b)
    state = latest_state(b)
    state["model"] = {k: v + 1 for k, v in state["model"].items()}  # a lagging or other copy: same name
    CheckpointManager(b).save(state, state["global_step"])
    endpoint, rdzv = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    nodes = []
    for run_dir, log in zip((a, b), logs, strict=True):
        cmd = torchrun_cmd(endpoint, rdzv, [*common, f"run_dir={run_dir}"], nproc=1)
        with log.open("w") as out:
            nodes.append(subprocess.Popen(cmd, env=job_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    wait_all(nodes, timeout=300)
    output = "".join(log.read_text() for log in logs)
    assert all(node.returncode != 0 for node in nodes), output[-3000:]
    assert worker_exit_codes(output) == [2, 2], output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rank 1 cannot load" in errors[0] and "its bytes differ from rank 0's" in errors[0], (
        errors
    )
    assert "step_0000004.pt, the checkpoint rank 0 resumes from" in errors[0]
    for run_dir in (a, b):  # nothing trained on either node
        assert latest_state(run_dir)["global_step"] == 4
