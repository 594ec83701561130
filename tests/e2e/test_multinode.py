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
