"""Fault tolerance with real processes: SIGKILL, stop signals, a crashed rank, bad checkpoints, NaNs."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from rnnddp.wandb_files import history, offline_runs
from tests.conftest import (
    REPO,
    effective_train_steps,
    job_cmd,
    job_env,
    latest_state,
    read_metrics,
    run_job,
    worker_exit_codes,
)

STEPS = 60
# Long enough that a signal sent at step 15 lands mid-run on a loaded machine; two layers, dropout and a
# cosine schedule make exactness meaningful. Exactness does not depend on the model's size.
ARGS = [
    "model.hidden_size=48",
    "model.num_layers=2",
    "model.dropout=0.2",
    "sched.name=cosine",
    "train.global_batch_size=64",
    f"train.max_steps={STEPS}",
    "train.log_every_steps=1",
    "checkpoint.every_steps=10",
    "wandb.mode=offline",  # what a user without a key gets: W&B is on in every fault test
    "eval.batch_size=2000",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, mnist_root) -> dict:
    run = tmp_path_factory.mktemp("ref") / "run"
    run_job([*ARGS, f"data.root={mnist_root}", f"run_dir={run}"], nproc=2)
    return latest_state(run)


def _assert_same_as(reference: dict, run: Path) -> None:
    state = latest_state(run)
    assert state["global_step"] == STEPS
    for k, v in reference["model"].items():
        assert torch.equal(v, state["model"][k]), f"parameter {k} differs"
    for i, s in reference["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, state["optimizer"]["state"][i][k]), f"optimizer state {i}.{k} differs"
    assert effective_train_steps(run) == list(range(1, STEPS + 1))  # none lost, none done twice


def _start(args: list[str]) -> subprocess.Popen:
    # Own session: the test can signal torchrun and its workers as a group.
    return subprocess.Popen(
        job_cmd(args, nproc=2),
        env=job_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: {proc.stdout.read()[-2000:]}")
        try:
            steps = [m["step"] for m in read_metrics(run) if "train/loss" in m]
        except (FileNotFoundError, ValueError):
            steps = []
        if steps and steps[-1] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _workers(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes, read from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{entry}/environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry)
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers and W&B's service under rank 0), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def _wait_gone(pids: Iterable[int], timeout: float = 60) -> None:
    pids = list(pids)
    deadline = time.time() + timeout
    while any(_alive(p) for p in pids):
        if time.time() > deadline:
            raise AssertionError(f"worker processes {[p for p in pids if _alive(p)]} still running")
        time.sleep(0.05)


@pytest.mark.parametrize("signals", [None, "[SIGUSR1]"])
def test_workers_stop_with_a_checkpoint_when_torchrun_alone_is_killed(tmp_path: Path, mnist_root, reference, signals):
    """torchrun starts each worker in its own session: with torchrun SIGKILLed (an OOM kill, say), they
    must not train on as orphans writing into the run directory; they stop as on the first stop signal."""
    run = tmp_path / "run"
    args = [*ARGS, f"data.root={mnist_root}", f"run_dir={run}"]
    if signals:
        args.append(f"train.stop_signals={signals}")
    proc = _start(args)
    _wait_for_step(run, 15, proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)  # torchrun alone
    proc.wait(timeout=30)
    _wait_gone(workers.values())
    stop = [m for m in read_metrics(run) if m.get("event") == "stopped"]
    assert len(stop) == 1 and 15 <= stop[0]["step"] < STEPS, stop
    assert stop[0]["signal"] == ("SIGUSR1" if signals else "SIGTERM")
    assert latest_state(run)["global_step"] == stop[0]["step"]
    run_job(args, nproc=2)
    _assert_same_as(reference, run)


@pytest.mark.quick
def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tmp_path: Path, mnist_root, reference):
    rng = random.Random()
    # The kill must land before the job's last step; on a loaded machine the poll can lag, so
    # a run that finished first is retried (it would prove nothing), up to three times.
    for attempt in range(3):
        kill_after = 10 * rng.randint(1, 3) + rng.randint(4, 7)  # steps past a checkpoint: some are redone
        print(f"attempt {attempt}: SIGKILL after step {kill_after}")
        run = tmp_path / f"run{attempt}"
        args = [*ARGS, f"data.root={mnist_root}", f"run_dir={run}"]
        proc = _start(args)
        _wait_for_step(run, kill_after, proc)
        # Everything, as an OOM kill of the job's cgroup would: the workers (in sessions of their
        # own: killpg(torchrun) misses them) and W&B's service, with whatever it had not yet written.
        doomed = _descendants(proc.pid)
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)  # no chance to save
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _wait_gone(doomed)
        if latest_state(run)["global_step"] < STEPS:
            break
    else:
        pytest.fail("the job finished before each SIGKILL landed; nothing was interrupted")
    resumed = run_job(args, nproc=2)
    assert "resuming from" in resumed.stdout
    _assert_same_as(reference, run)
    # W&B (offline) holds each step once over both sessions, whatever its killed service had written:
    # the steps it had are not sent again, those it lost come from metrics.jsonl (both paths alone:
    # tests/unit/test_wandb_resume.py).
    sessions = [[int(row["_step"]) for row in history(f)] for f in offline_runs(run)]
    steps = [s for session in sessions for s in session]
    resumed_at = [m["step"] for m in read_metrics(run) if m.get("event") == "resume"][0]
    print(f"W&B steps per session: {[(min(s), max(s)) for s in sessions if s]}; resumed at step {resumed_at}")
    assert sorted(steps) == list(range(1, STEPS + 1)), (
        f"W&B steps per session: {[(min(s), max(s)) for s in sessions if s]}"
    )


def _last_step(run: Path) -> int:
    return [m["step"] for m in read_metrics(run) if "train/loss" in m][-1]


@pytest.mark.parametrize("how", ["SIGUSR1 to rank 1 only", "SIGTERM to torchrun"])
def test_stop_signal_checkpoints_at_the_step_boundary_and_resumes_exactly(tmp_path: Path, mnist_root, reference, how):
    run = tmp_path / "run"
    # No periodic checkpoint before the end: the checkpoint at the stop step can only be the stop's own.
    args = [*ARGS, "checkpoint.every_steps=0", f"data.root={mnist_root}", f"run_dir={run}"]
    proc = _start(args)
    _wait_for_step(run, 15, proc)
    if how.startswith("SIGUSR1"):
        os.kill(_workers(proc.pid)[1], signal.SIGUSR1)  # rank 0 must learn of it through the vote
    else:
        os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards SIGTERM to its workers
    sent = _last_step(run)  # the signal landed at this step or in the one after it
    out, _ = proc.communicate(timeout=120)
    if how.startswith("SIGUSR1"):
        # Every worker exited 75 (resumable), as torchrun's failure report says.
        assert worker_exit_codes(out) == [75, 75], out[-3000:]
    else:
        # torchrun, itself stopped by the signal, reports no worker status: its own is non-zero, the log says 75.
        assert proc.returncode != 0 and "exiting 75" in out, out[-3000:]
    stop = [m for m in read_metrics(run) if m.get("event") == "stopped"]
    assert len(stop) == 1 and 15 <= stop[0]["step"] < STEPS
    # The ranks agree within 10 steps (a vote every 5th step, read at the next); +1 for the step in flight.
    assert stop[0]["step"] <= sent + 11, (stop, sent)
    assert latest_state(run)["global_step"] == stop[0]["step"]  # saved at the stop
    run_job(args, nproc=2)
    _assert_same_as(reference, run)


@pytest.mark.quick
def test_one_process_stops_at_the_next_step_and_exits_75(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    args = [*ARGS, "checkpoint.every_steps=0", f"data.root={mnist_root}", f"run_dir={run}"]
    proc = subprocess.Popen(
        job_cmd(args, nproc=1), env=job_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for_step(run, 15, proc)
    proc.send_signal(signal.SIGTERM)
    sent = _last_step(run)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stop = [m for m in read_metrics(run) if m.get("event") == "stopped"]
    assert len(stop) == 1 and sent <= stop[0]["step"] <= sent + 2, (stop, sent)  # no vote: the next step boundary
    assert latest_state(run)["global_step"] == stop[0]["step"]


def test_an_interrupt_exits_130(tmp_path: Path, mnist_root):
    # SIGINT not among the stop signals: Ctrl-C is a plain KeyboardInterrupt, as the second Ctrl-C
    # after a stop request is (tests/unit/test_trainer_loop.py shows the handler raising it).
    run = tmp_path / "run"
    args = [*ARGS, "train.stop_signals=[SIGTERM]", f"data.root={mnist_root}", f"run_dir={run}"]
    proc = subprocess.Popen(
        job_cmd(args, nproc=1), env=job_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for_step(run, 15, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out
    assert not [m for m in read_metrics(run) if m.get("event") == "stopped"]  # not the clean stop
    assert latest_state(run)["global_step"] in (10, 20)  # the periodic checkpoints stay intact


def test_crashed_rank_is_recovered_by_torchrun_restart(tmp_path: Path, mnist_root, reference):
    """A rank SIGKILLed mid-run (once: debug.fail_at_step acts on torchrun's first attempt only); torchrun's
    restart resumes from the checkpoint before it and ends bit for bit where the uncrashed run ends."""
    run = tmp_path / "run"
    args = [*ARGS, "debug.fail_at_step=35", "debug.fail_rank=1", f"data.root={mnist_root}", f"run_dir={run}"]
    proc = run_job(args, nproc=2, launcher=["--max-restarts=2"])
    out = proc.stdout + proc.stderr
    assert "killing rank 1 at step 35" in out and "resuming from" in out and "step_0000030.pt" in out, out[-3000:]
    _assert_same_as(reference, run)


DAMAGE_ARGS = ["model.hidden_size=16", "wandb.mode=disabled", "checkpoint.every_steps=10"]


@pytest.fixture(scope="module")
def finished_at_20(tmp_path_factory: pytest.TempPathFactory, mnist_root) -> Path:
    """One small finished run (checkpoints at steps 10 and 20), trained once and copied by each test that damages it."""
    run = tmp_path_factory.mktemp("damage") / "run"
    run_job([*DAMAGE_ARGS, "train.max_steps=20", f"data.root={mnist_root}", f"run_dir={run}"])
    return run


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete half"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(tmp_path: Path, mnist_root, finished_at_20, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_at_20, run)
    newest = run / "checkpoints" / "step_0000020.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        newest.write_bytes(data[:1000] + bytes(b ^ 0xFF for b in data[1000:1010]) + data[1010:])
    else:
        newest.write_bytes(data[: len(data) // 2])
    proc = run_job([*DAMAGE_ARGS, "train.max_steps=30", f"data.root={mnist_root}", f"run_dir={run}"])
    assert "skipping checkpoint" in proc.stdout and "step_0000020.pt" in proc.stdout
    assert "resuming from" in proc.stdout and "step_0000010.pt at step 10" in proc.stdout


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path: Path, mnist_root):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": Payload(), "global_step": 1}, f)
    assert not marker.exists()
    proc = run_job(
        ["wandb.mode=disabled", f"data.root={mnist_root}", f"resume={evil}", f"run_dir={tmp_path}/run"], check=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to load" in lines[0], proc.stderr
    assert not marker.exists()


def test_nonfinite_loss_stops_with_the_last_good_checkpoint_latest(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    proc = run_job(
        [
            "model.hidden_size=16",
            "wandb.mode=disabled",
            "train.log_every_steps=1",
            "checkpoint.every_steps=1",  # a save is due at every step, the non-finite ones too
            "train.max_nonfinite=3",
            "debug.nonfinite_from_step=12",
            "train.max_steps=40",
            f"data.root={mnist_root}",
            f"run_dir={run}",
        ],
        check=False,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr
    assert "loss was not finite for 3 consecutive steps (by step 14)" in proc.stderr
    assert "not saving step 12: the last loss was not finite" in proc.stdout
    state = latest_state(run)
    assert state["global_step"] == 11
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "checkpoints" / "step_0000012.pt").exists()


SAVE_AND_HANG = """
import sys, torch
from rnnddp.checkpoint import CheckpointManager
# A state big enough that its save takes a while; the test kills this process while it is written.
CheckpointManager(sys.argv[1]).save({"model": {"w": torch.randn(150_000_000)}, "global_step": 6}, 6)
"""


def test_a_process_killed_mid_save_leaves_latest_intact_and_its_leftover_is_removed(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    args = ["model.hidden_size=16", "wandb.mode=disabled", f"data.root={mnist_root}", f"run_dir={run}"]
    run_job([*args, "train.max_steps=5"])
    ckpt = run / "checkpoints"
    saver = subprocess.Popen([sys.executable, "-c", SAVE_AND_HANG, str(run)], env=job_env(), cwd=REPO)
    deadline = time.time() + 120
    while not list(ckpt.glob("step_0000006.pt.tmp.*")):
        assert saver.poll() is None and time.time() < deadline, "the save finished or never began"
        time.sleep(0.005)
    time.sleep(0.05)  # well into the write
    saver.kill()  # SIGKILL: no handler, no cleanup
    saver.wait()
    leftover = list(ckpt.glob("step_0000006.pt.tmp.*"))
    assert leftover and not (ckpt / "step_0000006.pt").exists()
    assert (ckpt / "latest").read_text().strip() == "step_0000005.pt"
    proc = run_job([*args, "train.max_steps=10"])  # resume=auto: from step 5, and the leftover goes
    assert "removed" in proc.stdout and "resuming from" in proc.stdout and "step_0000005.pt at step 5" in proc.stdout
    assert not any(".tmp" in p.name for p in ckpt.iterdir())
    assert latest_state(run)["global_step"] == 10
