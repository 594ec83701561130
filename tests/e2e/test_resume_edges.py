"""A stop at any step position resumes exactly: the first step, the last of every epoch, the last of the run.

A small run (3 steps per epoch, 3 epochs) of a prepared sequence folder, W&B offline. In one process
each run of a chain resumes where the one before stopped and stops one step later (a real SIGTERM
after that step, ``debug.stop_at_step``), so the chain walks every position; it must end bit-for-bit
equal to the uninterrupted run, with each step once in metrics.jsonl and in W&B's files. On two
torchrun ranks the stop lands where the ranks' vote agrees (every 5th step), here the last step of
an epoch, and the resumed run matches the uninterrupted 2-rank run bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnddp import checkpoint
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config
from rnnddp.dist import DistInfo
from rnnddp.errors import EXIT_STOPPED, UserError
from rnnddp.job import run
from rnnddp.metrics import kept_records
from rnnddp.wandb_files import history, offline_runs
from tests.conftest import effective_train_steps, latest_state, read_metrics, run_job
from tests.sequence_files import tiny_prepared

STEPS_PER_EPOCH, EPOCHS = 3, 3


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "task=sequence_classification",
        f"sequences.path={data}",
        f"run_dir={run_dir}",
        "train.global_batch_size=8",
        f"train.epochs={EPOCHS}",
        "train.log_every_steps=1",
        "model.hidden_size=8",
        "seed=3",
        "eval.plots=false",
        *extra,
    ]


def run_in_process(argv: list[str]) -> int:
    """The job as train_ddp.py runs it on one process, in this one (no launcher: no per-run start-up)."""
    return run(load_config(argv), DistInfo())


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "optimizer"):
        fa, fb = _tensors(a[key]), _tensors(b[key])
        assert fa.keys() == fb.keys()
        for name in fa:
            assert torch.equal(fa[name], fb[name]), f"{key} {name} differs"
    assert a["global_step"] == b["global_step"]


def _tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def wandb_steps(run_dir: Path) -> list[int]:
    """Every train-loss step in every W&B session's file of ``run_dir``."""
    return sorted(
        int(row["_step"]) for f in offline_runs(run_dir) for row in history(f) if "train/loss" in row and "_step" in row
    )


def test_a_stop_after_every_step_position_resumes_bit_exact(tmp_path: Path):
    data = tiny_prepared(tmp_path)
    total = STEPS_PER_EPOCH * EPOCHS
    assert run_in_process(args(data, tmp_path / "whole")) == 0
    chain = tmp_path / "chain"
    positions = []
    for k in range(1, total):  # a stop after the last step finishes the run instead (tests/unit/test_trainer_loop.py)
        assert run_in_process(args(data, chain, f"debug.stop_at_step={k}")) == EXIT_STOPPED, k
        state = latest_state(chain)
        assert state["global_step"] == k
        # Never a position past an epoch's end: the next epoch's start instead.
        assert 0 <= state["step_in_epoch"] < STEPS_PER_EPOCH, (k, state["epoch"], state["step_in_epoch"])
        assert state["epoch"] * STEPS_PER_EPOCH + state["step_in_epoch"] == k
        positions.append((state["epoch"], state["step_in_epoch"]))
    assert run_in_process(args(data, chain)) == 0
    assert_same_state(latest_state(chain), latest_state(tmp_path / "whole"))
    assert effective_train_steps(chain) == list(range(1, total + 1))
    stops = [m["step"] for m in read_metrics(chain) if m.get("event") == "stopped"]
    assert stops == list(range(1, total))
    assert wandb_steps(chain) == list(range(1, total + 1))
    assert not (chain / "plots").exists()  # eval.plots=false: no pictures, not even their folder
    # Validation ran at every epoch's end, stopped there or not: the same results as the whole run.
    vals = [(m["step"], m["val/accuracy"]) for m in read_metrics(chain) if "val/accuracy" in m]
    whole = [(m["step"], m["val/accuracy"]) for m in read_metrics(tmp_path / "whole") if "val/accuracy" in m]
    assert sorted(set(vals)) == whole
    print(f"positions (epoch, step in epoch) stopped at and resumed from: {positions}")


def test_an_old_stop_checkpoint_past_an_epoch_end_resumes_at_the_next_epoch(tmp_path: Path):
    """A checkpoint written by the unfixed stop (step_in_epoch == steps per epoch) resumes, exactly."""
    data = tiny_prepared(tmp_path)
    assert run_in_process(args(data, tmp_path / "whole")) == 0
    run_dir = tmp_path / "old"
    assert run_in_process(args(data, run_dir, "debug.stop_at_step=3")) == EXIT_STOPPED  # epoch 0's last step
    state = latest_state(run_dir)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 1, 0)
    state["epoch"], state["step_in_epoch"] = 0, STEPS_PER_EPOCH  # as the old code wrote it
    CheckpointManager(run_dir).save(state, 3)
    assert run_in_process(args(data, run_dir)) == 0
    assert_same_state(latest_state(run_dir), latest_state(tmp_path / "whole"))


def test_two_ranks_stopped_on_an_epochs_last_step_resume_bit_exact(tmp_path: Path):
    """torchrun, 2 gloo ranks, 5 steps per epoch: SIGTERM to rank 1 after step 1, the ranks agree at step
    10 (the last of epoch 1); the rerun resumes there and ends equal to an uninterrupted 2-rank run."""
    data = tiny_prepared(tmp_path, train=50)  # 40 train sequences: 5 batches of 8
    common = ["train.epochs=3", "debug.fail_rank=1"]
    run_job(args(data, tmp_path / "whole", *common), nproc=2)
    stopped = run_job(args(data, tmp_path / "run", *common, "debug.stop_at_step=1"), nproc=2, check=False)
    assert stopped.returncode != 0, stopped.stdout[-2000:]
    state = latest_state(tmp_path / "run")
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (10, 2, 0), stopped.stderr[-3000:]
    assert read_metrics(tmp_path / "run")[-1]["event"] == "stopped"
    run_job(args(data, tmp_path / "run", *common), nproc=2)
    assert_same_state(latest_state(tmp_path / "run"), latest_state(tmp_path / "whole"))
    assert effective_train_steps(tmp_path / "run") == list(range(1, 16))
    assert wandb_steps(tmp_path / "run") == list(range(1, 16))


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")


# -- a rerun with a new setting -------------------------------------------------------------------


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_rerun_with_another_setting_is_refused_in_one_line_and_writes_nothing(tmp_path: Path):
    data = tiny_prepared(tmp_path)
    run_dir = tmp_path / "run"
    assert run_in_process(args(data, run_dir, "debug.stop_at_step=4", "wandb.mode=disabled")) == EXIT_STOPPED
    before = snapshot(run_dir)
    proc = run_job(args(data, run_dir, "optim.lr=0.5", "wandb.mode=disabled"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        f"error: checkpoint {run_dir}/checkpoints/step_0000004.pt was trained with optim.lr=0.005, the config "
        "says 0.5; set optim.lr=0.005 to resume that run, or start a new run with name=NEW"
    ]
    assert snapshot(run_dir) == before
    # A finished run is no different: the new setting is refused, not "already finished".
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled")) == 0
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="was trained with seed=3, the config says 7"):
        run_in_process(args(data, run_dir, "seed=7", "wandb.mode=disabled"))
    assert snapshot(run_dir) == before


def test_safe_settings_are_applied_recorded_and_config_yaml_holds_them(tmp_path: Path):
    data = tiny_prepared(tmp_path)
    run_dir = tmp_path / "run"
    assert run_in_process(args(data, run_dir, "debug.stop_at_step=4", "wandb.mode=disabled")) == EXIT_STOPPED
    assert "every_steps: 0" in (run_dir / "config.yaml").read_text()
    assert run_in_process(args(data, run_dir, "eval.every_steps=1", "checkpoint.keep=9", "wandb.mode=disabled")) == 0
    resumed = [m for m in read_metrics(run_dir) if m.get("event") == "resume"]
    assert resumed[-1]["changed"] == {
        "eval.every_steps": [0, 1],
        "checkpoint.keep": [3, 9],
        "debug.stop_at_step": [4, 0],
    }
    saved = (run_dir / "config.yaml").read_text()
    assert "every_steps: 1" in saved and "keep: 9" in saved  # the values this session used
    assert [m["step"] for m in read_metrics(run_dir) if "val/accuracy" in m] == [3, *range(5, 10)]


def test_lengthening_a_run_continues_it_as_if_it_had_been_that_long(tmp_path: Path):
    """constant schedule: 2 epochs then 3 equals 3 from the start, bit for bit. onecycle: the LR after the
    resume follows the 3-epoch schedule from the resume step on."""
    from rnnddp.config import load_config as cfg_of
    from rnnddp.train.optim import lr_factor

    data = tiny_prepared(tmp_path)
    flat = ["sched.name=constant", "wandb.mode=disabled"]
    assert run_in_process(args(data, tmp_path / "long", *flat)) == 0
    short = tmp_path / "short"
    assert run_in_process(args(data, short, *flat, "train.epochs=2")) == 0  # finished, tested
    assert run_in_process(args(data, short, *flat)) == 0  # epochs=3: lengthened, not "already finished"
    assert_same_state(latest_state(short), latest_state(tmp_path / "long"))
    assert [m["step"] for m in read_metrics(short) if "test/accuracy" in m] == [6, 9]

    cycle = tmp_path / "cycle"
    assert run_in_process(args(data, cycle, "train.epochs=2", "wandb.mode=disabled")) == 0
    assert run_in_process(args(data, cycle, "wandb.mode=disabled")) == 0
    cfg = cfg_of(args(data, cycle))
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(cycle) if "train/lr" in m}
    for step in (7, 8):  # the LR logged after step s is the one for step s + 1 (0-based s)
        assert lrs[step] == pytest.approx(cfg.optim.lr * lr_factor(step, 9, cfg.sched), rel=1e-9)


def test_journey_only_checkpoint_damaged_then_rerun_starts_over_once(tmp_path: Path):
    """Found by the journeys (tests/journeys/): a finished run kept only its newest checkpoint; a user
    damaged it; the rerun started over and appended steps 1, 2, ... after the old 1..9 in metrics.jsonl,
    so each step counted twice. Now it starts over with a ``restart`` event that voids the old records."""
    data = tiny_prepared(tmp_path)
    run_dir = tmp_path / "run"
    assert run_in_process(args(data, run_dir, "checkpoint.keep=1")) == 0
    assert "restart" not in [m.get("event") for m in read_metrics(run_dir)]  # a fresh run is no restart
    (only,) = CheckpointManager(run_dir).step_files()
    raw = bytearray(only.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    only.write_bytes(bytes(raw))
    assert run_in_process(args(data, run_dir, "checkpoint.keep=1", "debug.stop_at_step=2")) == EXIT_STOPPED
    assert [m["step"] for m in read_metrics(run_dir) if m.get("event") == "restart"] == [0]
    assert effective_train_steps(run_dir) == [1, 2]
    assert run_in_process(args(data, run_dir, "checkpoint.keep=1")) == 0
    assert effective_train_steps(run_dir) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))


def test_journey_final_checkpoint_destroyed_then_stopped_tests_again_only_at_its_new_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Found by the journeys: a finished run's final checkpoint destroyed, then a stop before the end. The
    resume from the checkpoint before voids the old final test (the journeys' promise had counted it).
    Beside it, a job that crashed in its new final test: the rerun must test, not take the voided
    ``finished`` event of the first end for this one ("already finished, nothing to do")."""
    import rnnddp.job as job

    def tests_and_ends(run_dir: Path) -> tuple[list[int], list[int]]:
        kept = kept_records(run_dir / "metrics.jsonl", events=True)
        tests = [m["step"] for m in kept if "test/loss" in m]
        return tests, [m["step"] for m in kept if m.get("event") == "finished"]

    data = tiny_prepared(tmp_path)
    run_dir, end = tmp_path / "run", STEPS_PER_EPOCH * EPOCHS
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled")) == 0
    assert tests_and_ends(run_dir) == ([end], [end])
    newest = CheckpointManager(run_dir).step_files()[0]
    newest.write_bytes(newest.read_bytes()[:100])
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled", f"debug.stop_at_step={end - 2}")) == EXIT_STOPPED
    assert tests_and_ends(run_dir) == ([], [])  # the resume from step end - 3 voided the first end's test

    def crash(*a: object, **k: object) -> None:
        raise RuntimeError("killed in the final test")

    monkeypatch.setattr(job, "evaluate_on_test", crash)
    with pytest.raises(RuntimeError, match="killed in the final test"):
        run_in_process(args(data, run_dir, "wandb.mode=disabled"))
    monkeypatch.undo()
    assert CheckpointManager(run_dir).find_latest().name == f"step_{end:07d}.pt"  # trained to the end, untested
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled")) == 0
    assert tests_and_ends(run_dir) == ([end], [end])


def test_journey_newest_damaged_then_a_refused_rerun_leaves_it_to_the_next_run(tmp_path: Path):
    """Found by the journeys (their model was wrong, the job right): a finished run, its newest checkpoint
    damaged by the user, a rerun with an unsafe setting. The refusal writes nothing, so ``latest`` still
    names the damaged file; the next run resumes from the intact one before it and points ``latest`` at
    its own complete checkpoint."""
    data = tiny_prepared(tmp_path)
    run_dir, end = tmp_path / "run", STEPS_PER_EPOCH * EPOCHS
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled")) == 0
    newest = CheckpointManager(run_dir).step_files()[0]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="hidden_size: checkpoint 8 vs config 12"):
        run_in_process(args(data, run_dir, "wandb.mode=disabled", "model.hidden_size=12"))
    assert snapshot(run_dir) == before
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled")) == 0
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert checkpoint.verify(latest, require_marker=True) is None
    assert latest_state(run_dir)["global_step"] == end
    assert effective_train_steps(run_dir) == list(range(1, end + 1))


def test_journey_newest_damaged_then_killed_before_a_save_leaves_latest_on_a_complete_checkpoint(tmp_path: Path):
    """Found by the journeys: a finished run, its newest checkpoint damaged by the user, a rerun SIGKILLed
    before its first save. The rerun had resumed from the intact checkpoint before, but ``latest`` still
    named the damaged one. A run now points ``latest`` at the checkpoint it continues from once it goes ahead."""
    data = tiny_prepared(tmp_path)
    run_dir, end = tmp_path / "run", STEPS_PER_EPOCH * EPOCHS
    assert run_in_process(args(data, run_dir, "wandb.mode=disabled")) == 0
    newest = CheckpointManager(run_dir).step_files()[0]
    newest.write_bytes(newest.read_bytes()[:100])
    # The kill and the rerun under the defaults users get: W&B on (offline without a key).
    killed = run_job(args(data, run_dir, f"debug.fail_at_step={end}"), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert checkpoint.verify(latest, require_marker=True) is None, latest
    assert latest.name == f"step_{end - STEPS_PER_EPOCH:07d}.pt"
    assert run_in_process(args(data, run_dir)) == 0
    assert latest_state(run_dir)["global_step"] == end
    assert effective_train_steps(run_dir) == list(range(1, end + 1))


KILLED_AFTER_ITS_TEST = """
import os, signal, sys
import rnnddp.job as job
import train_ddp

tested = job.evaluate_on_test


def then_killed(*args, **kwargs):
    result = tested(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # before the finished event, as a kill at that moment does
    return result


job.evaluate_on_test = then_killed
train_ddp.main(sys.argv[1:])
"""


def test_journey_killed_between_its_final_test_and_its_end_keeps_one_test_when_rerun(tmp_path: Path):
    """Found by the journeys (a SIGKILL at a drawn moment): a run killed after its final test was logged but
    before its ``finished`` event. The rerun tests the same model again; its test must replace the first,
    not stand beside it as a second evaluation of the test split (metrics.jsonl, the learning curves)."""
    import subprocess
    import sys

    from tests.conftest import REPO, job_env

    data = tiny_prepared(tmp_path)
    run_dir, end = tmp_path / "run", STEPS_PER_EPOCH * EPOCHS
    argv = args(data, run_dir)  # W&B on (offline without a key), as users have it
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ITS_TEST, *argv], env=job_env(), cwd=REPO, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    records = read_metrics(run_dir)
    assert [m["step"] for m in records if "test/loss" in m] == [end]
    assert "finished" not in [m.get("event") for m in records]
    assert run_in_process(argv) == 0
    kept = kept_records(run_dir / "metrics.jsonl", events=True)
    assert [m["step"] for m in kept if "test/loss" in m] == [end]  # the rerun's test, not both
    assert [m["step"] for m in kept if m.get("event") == "finished"] == [end]
    assert [m["step"] for m in read_metrics(run_dir) if "test/loss" in m] == [end, end]  # both were run


KILLED_WHILE_WANDB_FINISHES = """
import os, signal, sys
import wandb
import train_ddp


def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


wandb.Run.finish = killed
train_ddp.main(sys.argv[1:])
"""


def test_journey_killed_while_wandb_finishes_gives_wandb_every_step_when_rerun(tmp_path: Path):
    """Found by the journeys (text: stop after step 2, evaluate, a SIGKILL at a drawn moment near the end,
    a rerun): a job killed after its final test while W&B was finishing left W&B's offline file without
    the steps since its start, and its ``finished`` event made the rerun a no-op that never gave them back.
    The event now goes in after W&B has finished, so the rerun tests again and backfills W&B."""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, job_env

    data = tiny_prepared(tmp_path)
    run_dir, end = tmp_path / "run", STEPS_PER_EPOCH * EPOCHS
    argv = args(data, run_dir)  # W&B on (offline without a key), as users have it
    assert run_in_process([*argv, "debug.stop_at_step=2"]) == EXIT_STOPPED
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WANDB_FINISHES, *argv],
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert effective_train_steps(run_dir) == list(range(1, end + 1))
    assert run_in_process(argv) == 0
    deadline = time.monotonic() + 20  # W&B's service may still be writing its file
    while sorted(set(wandb_steps(run_dir))) != list(range(1, end + 1)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert sorted(set(wandb_steps(run_dir))) == list(range(1, end + 1))
    kept = kept_records(run_dir / "metrics.jsonl", events=True)
    assert [m["step"] for m in kept if "test/loss" in m] == [end]
    assert [m["step"] for m in kept if m.get("event") == "finished"] == [end]
