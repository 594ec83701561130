"""Real processes: torchrun with gloo on CPU, the real MNIST, the real entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnddp.models import build_model
from rnnddp.wandb_files import history, offline_runs
from tests.conftest import REPO, final_eval, free_port, job_env, latest_state, read_metrics, run_job, worker_exit_codes

SHORT = [
    "model.hidden_size=32",
    "train.global_batch_size=64",
    "wandb.mode=disabled",
    "eval.batch_size=2000",
]


def _params_close(a: dict, b: dict, atol: float) -> float:
    worst = 0.0
    for k in a["model"]:
        worst = max(worst, (a["model"][k] - b["model"][k]).abs().max().item())
    assert worst <= atol, f"max parameter difference {worst} > {atol}"
    return worst


EQUIV = ["train.max_steps=20", "optim.lr=0.01", "sched.name=cosine"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, mnist_root) -> dict:
    """The 1-process reference of the equivalence tests, trained once."""
    run = tmp_path_factory.mktemp("one") / "run"
    run_job([*SHORT, *EQUIV, f"data.root={mnist_root}", f"run_dir={run}"], nproc=1)
    return latest_state(run)


@pytest.mark.quick
@pytest.mark.parametrize("grad_sync", ["auto", "allreduce"])  # auto = one all-gather on gloo
def test_two_ranks_match_one_process(tmp_path: Path, mnist_root, one_process, grad_sync: str):
    # Same seed and global batch: gradients averaged over 2 shards == one process on the batch.
    args = [*SHORT, *EQUIV, f"data.root={mnist_root}"]
    two_proc = run_job([*args, f"dist.grad_sync={grad_sync}", f"run_dir={tmp_path}/w2"], nproc=2)
    # auto on gloo with 2 ranks is the all-gather (see the bit-for-bit test below for what it gives).
    expected = {"auto": "allgather", "allreduce": "allreduce"}[grad_sync]
    assert f"gradients by {expected}" in two_proc.stdout, two_proc.stdout[-2000:]
    one, two = one_process, latest_state(tmp_path / "w2")
    assert one["global_step"] == two["global_step"] == 20
    assert two["world_size"] == 2 and len(two["rng"]) == 2
    _params_close(one, two, atol=1e-5)
    # The parameters did move: the comparison is not between two initialisations.
    torch.manual_seed(0)
    init = build_model(one["model_args"]).state_dict()
    moved = max((one["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3


def _grads_on_rank(rank: int, world: int, port: int, mode: str, out: str) -> None:
    import torch.distributed as tdist

    from rnnddp.dist import DistInfo, wrap_ddp

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        args = dict(cell="lstm", input_size=28, hidden_size=16, num_layers=1, dropout=0.0, bidirectional=False)
        module = build_model({**args, "num_classes": 10})
        info = DistInfo(rank=rank, world_size=world, backend="gloo")
        model = wrap_ddp(module, info, mode)
        x = torch.randn(8, 28, 28, generator=torch.Generator().manual_seed(100 + rank))  # another batch per rank
        y = torch.arange(8) % 10
        torch.nn.functional.cross_entropy(model(x), y).backward()
        synced = [p.grad.clone() for p in module.parameters()]
        # Each rank's own gradients, gathered, summed in rank order and divided: what the hook promises.
        reference = build_model({**args, "num_classes": 10})
        reference.load_state_dict(module.state_dict())
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        own = [p.grad for p in reference.parameters()]
        every: list = [None] * world
        tdist.all_gather_object(every, own)
        mean = [sum(g[i] for g in every) / world for i in range(len(own))]
        torch.save({"synced": synced, "mean": mean}, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_allgather_hook_gives_every_rank_the_same_mean_bit_for_bit(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _grads_on_rank, args=(2, free_port(), "allgather", str(tmp_path)), nprocs=2, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, b, m in zip(r0["synced"], r1["synced"], r0["mean"], strict=True):
        assert torch.equal(a, b)  # bit-identical on both ranks
        assert torch.equal(a, m)  # exactly the rank-order mean (two ranks: one addition, one division)
    assert any(g.abs().max() > 0 for g in r0["synced"])


@pytest.mark.quick
def test_resume_mid_epoch_is_bitwise_exact(tmp_path: Path, mnist_root):
    # Dropout (2 layers) and a cosine schedule: exact only if RNG, optimiser and schedule come back.
    args = [
        *SHORT,
        f"data.root={mnist_root}",
        "model.num_layers=2",
        "model.dropout=0.3",
        "sched.name=cosine",
        "train.max_steps=30",
        "checkpoint.every_steps=10",
    ]
    run_job([*args, f"run_dir={tmp_path}/full"], nproc=2)
    mid = tmp_path / "full" / "checkpoints" / "step_0000020.pt"
    assert mid.is_file()
    # Continue another run directory from step 20 of the first.
    run_job([*args, f"run_dir={tmp_path}/resumed", f"resume={mid}"], nproc=2)
    full, resumed = latest_state(tmp_path / "full"), latest_state(tmp_path / "resumed")
    assert resumed["global_step"] == 30
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    for k, v in full["optimizer"]["state"][0].items():
        assert torch.equal(v, resumed["optimizer"]["state"][0][k]), k
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed") if "train/loss" in m]
    assert steps == [30]  # only steps 21..30 ran (logged once, at the end)


def test_resume_auto_continues_and_finished_run_exits_0(tmp_path: Path, mnist_root):
    """resume=auto continues a run bit for bit, in the same W&B run (offline: each step once over the two
    sessions, with the values logged); a rerun of the finished run does nothing and opens no W&B session."""
    args = [
        *SHORT,
        f"data.root={mnist_root}",
        "model.num_layers=2",
        "model.dropout=0.3",
        "sched.name=constant",
        "train.log_every_steps=5",
    ]
    run_job([*args, "train.max_steps=25", f"run_dir={tmp_path}/a"], nproc=2)
    b = tmp_path / "b"
    args_b = [*args, "wandb.mode=offline", f"run_dir={b}"]
    run_job([*args_b, "train.max_steps=15"], nproc=2)
    first = latest_state(b)["wandb_run_id"]
    proc = run_job([*args_b, "train.max_steps=25"], nproc=2)  # resume=auto, lengthened
    assert "resuming from" in proc.stdout and "step 15" in proc.stdout
    final_a, final_b = latest_state(tmp_path / "a"), latest_state(b)
    for k in final_a["model"]:
        assert torch.equal(final_a["model"][k], final_b["model"][k]), k
    train_steps = [m["step"] for m in read_metrics(b) if "train/loss" in m]
    assert train_steps == [5, 10, 15, 20, 25]  # none lost, none twice
    again = run_job([*args_b, "train.max_steps=25"], nproc=2)
    assert "already finished at step 25" in again.stdout
    assert [m["step"] for m in read_metrics(b) if "train/loss" in m] == train_steps
    # W&B: one run, two sessions, read back from its files: each step once, with what was logged.
    assert final_b["wandb_run_id"] == first
    files = offline_runs(b)
    assert len(files) == 2 and all(f.name == f"run-{first}.wandb" for f in files), files
    rows = [row for f in files for row in history(f)]
    assert [int(r["_step"]) for r in rows] == train_steps, rows
    logged = {m["step"]: m["train/loss"] for m in read_metrics(b) if "train/loss" in m}
    assert [float(r["train/loss"]) for r in rows] == pytest.approx([logged[s] for s in train_steps], rel=1e-6)
    assert "val/accuracy" in rows[2] and "test/accuracy" in rows[-1]


def test_world_size_change_on_resume_keeps_the_data_position(tmp_path: Path, mnist_root):
    args = [*SHORT, f"data.root={mnist_root}", "sched.name=constant"]
    run_job([*args, "train.max_steps=20", f"run_dir={tmp_path}/ref"], nproc=1)
    run_job([*args, "train.max_steps=10", f"run_dir={tmp_path}/mix"], nproc=2)
    proc = run_job([*args, "train.max_steps=20", f"run_dir={tmp_path}/mix"], nproc=1)
    assert "written by 2 ranks, resuming on 1" in proc.stdout + proc.stderr
    _params_close(latest_state(tmp_path / "ref"), latest_state(tmp_path / "mix"), atol=1e-5)


def test_checkpoint_of_another_shape_is_refused_untouched(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    run_job([*SHORT, f"data.root={mnist_root}", "train.max_steps=5", f"run_dir={run}"])
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    config_before = (run / "config.yaml").read_text()
    proc = run_job(
        [*SHORT, f"data.root={mnist_root}", "train.max_steps=10", "model.hidden_size=48", f"run_dir={run}"], check=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "different model (hidden_size: checkpoint 32 vs config 48)" in lines[0], proc.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert (run / "config.yaml").read_text() == config_before


def test_resume_none_refuses_to_overwrite(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    run_job([*SHORT, f"data.root={mnist_root}", "train.max_steps=5", f"run_dir={run}"])
    proc = run_job(
        [*SHORT, f"data.root={mnist_root}", "train.max_steps=5", "resume=none", f"run_dir={run}"], check=False
    )
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr


def test_missing_data_folder_exits_2_under_torchrun(tmp_path: Path):
    proc = run_job(
        [*SHORT, f"data.root={tmp_path}/nothing", "data.download=false", f"run_dir={tmp_path}/run"],
        nproc=2,
        check=False,
    )
    assert worker_exit_codes(proc.stderr) == [2, 2], proc.stderr[-3000:]  # both ranks: bad input
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "MNIST not found in" in errors[0] and "nothing" in errors[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_accelerate_launch_trains_on_cpu(tmp_path: Path, mnist_root):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",  # precision=auto follows it
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / "train_ddp.py"),
        *SHORT,
        f"data.root={mnist_root}",
        "train.max_steps=60",
        "sched.name=constant",
        f"run_dir={tmp_path}/run",
    ]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = latest_state(tmp_path / "run")
    assert state["world_size"] == 2 and state["global_step"] == 60
    assert "precision bf16" in proc.stdout
    assert final_eval(tmp_path / "run")["test/accuracy"] > 0.5  # 60 steps already learn something


def test_rank_zero_work_longer_than_the_peer_timeout_is_waited_for(tmp_path: Path, mnist_root):
    """dist.peer_timeout_s bounds the training step's collectives only: the others wait for rank 0's
    validation and final test (seconds here, with a 2 s peer timeout) in the long-timeout group."""
    args = [
        "model.hidden_size=256",
        "model.num_layers=2",
        "train.global_batch_size=64",
        "train.max_steps=20",
        "eval.batch_size=5",
        # Validated and saved at the last step only: no checkpoint write for the others to wait for
        # in a step's exchange, which a loaded disk could stretch past 2 s.
        "dist.peer_timeout_s=2",
        "wandb.mode=disabled",
        f"data.root={mnist_root}",
        f"run_dir={tmp_path}/run",
    ]
    out = run_job(args, nproc=2).stdout
    assert "lost contact" not in out
    vals = [m for m in read_metrics(tmp_path / "run") if "val/accuracy" in m]
    assert [m["step"] for m in vals] == [20]
    took = vals[-1]["time"] - [m for m in read_metrics(tmp_path / "run") if m.get("step") == 20][0]["time"]
    print(f"rank 0 validated for {took:.2f} s while the other rank waited (peer timeout 2 s)")
    assert took > 2.0, "validation was quicker than the peer timeout: the test proves nothing"
