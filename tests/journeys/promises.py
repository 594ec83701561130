"""The job's contract, as checked after every action of a journey (tests/journeys/machine.py).

Each function is one promise; each raises AssertionError naming what broke it.

1. The exit code is one the action documents (0 done, 2 bad input, 75 stopped and resumable; a
   SIGKILLed process -9), and the one the journey's model predicts where it can.
2. A refusal (exit 2) leaves the run directory as it was: not a byte written.
3. ``latest`` names a complete checkpoint (its file intact, its .sha256 marker written) after every
   action of the job (a user's damage is the user's until the next run).
4. Each training step appears once in metrics.jsonl (a resume voids the records past it) and once in
   W&B's offline files over all sessions; a finished run has them all.
5. config.yaml holds the settings the run trains with, never a refused rerun's.
6. The test split is evaluated at the end only: none before the run first finishes, none but at its last step.
7. A run that reaches its end has the parameters of an uninterrupted run with the same settings:
   bit for bit on one process, to 1e-5 when some of its steps ran on two ranks.
8. A run that reaches its end validated where that uninterrupted run did, once at each step, with its
   results (to 1e-5; 1e-3 after two ranks): a stop or a kill never skips an epoch's validation nor repeats one.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from rnnddp import checkpoint
from rnnddp.metrics import is_test_record, kept_records
from rnnddp.wandb_files import history, offline_runs
from tests.conftest import effective_train_steps

WANDB_SETTLE_S = 20.0
EXIT_CODES = {
    "run": {0, 2, 75},
    "stop": {0, 75},
    "kill": {0, -9},
    "kill_anytime": {0, -9},
    "rerun_safe": {0},
    "rerun_unsafe": {0, 2},
    "two_ranks": {0},
    "evaluate": {0, 2},
    "predict": {0, 2},
}


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``run_dir``: (size, mtime in ns)."""
    if not run_dir.exists():
        return {}
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()
    }


def exit_code(action: str, code: int, predicted: int | None) -> None:
    assert code in EXIT_CODES[action], f"{action} exited {code}; documented: {sorted(EXIT_CODES[action])}"
    assert predicted is None or code == predicted, f"{action} exited {code}; the journey's model predicts {predicted}"


def refusal_wrote_nothing(code: int, before: dict, after: dict) -> None:
    if code == 2:
        changed = sorted(set(before.items()) ^ set(after.items()))
        assert not changed, f"a refusal (exit 2) changed the run directory: {changed[:5]}"


def latest_is_complete(run_dir: Path) -> None:
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        target = run_dir / "checkpoints" / pointer.read_text().strip()
        reason = checkpoint.verify(target, require_marker=True)
        assert reason is None, f"latest names {target.name}, which is not a complete checkpoint: {reason}"


def wandb_steps(run_dir: Path, run_id: str | None = None) -> list[int]:
    """The train-loss steps in W&B's offline files (of one W&B run, when ``run_id`` is given)."""
    files = [f for f in offline_runs(run_dir) if run_id is None or f.name == f"run-{run_id}.wandb"]
    return [int(r["_step"]) for f in files for r in history(f) if "train/loss" in r and "_step" in r]


def steps_once(run_dir: Path, finished_at: int | None) -> None:
    """A run that starts over (no intact checkpoint) is a new W&B run: steps are once per W&B run."""
    if not (run_dir / "metrics.jsonl").exists():
        return
    steps = effective_train_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), f"metrics.jsonl's steps are not 1..n once each: {steps}"
    for f in offline_runs(run_dir):
        twice = [s for s, n in Counter(wandb_steps(run_dir, f.name[4:-6])).items() if n > 1]
        assert not twice, f"W&B run {f.name} holds steps {twice[:10]} more than once over its sessions"
    if finished_at is not None:
        assert steps == list(range(1, finished_at + 1)), f"a finished run's metrics.jsonl steps: {steps}"
        found = checkpoint.CheckpointManager(run_dir).find_latest()
        run_id = torch.load(found, weights_only=True)["wandb_run_id"]
        # W&B's service (shared by the runs of one process) may still be writing its file when the job
        # returns: wait for it, a bounded while.
        deadline = time.monotonic() + WANDB_SETTLE_S
        while sorted(wandb_steps(run_dir, run_id)) != steps and time.monotonic() < deadline:
            time.sleep(0.25)
        got = sorted(wandb_steps(run_dir, run_id))
        assert got == steps, f"a finished run's W&B run holds steps {got}, not each of 1..{finished_at} once"


def config_is_the_runs(run_dir: Path, settings: dict[str, str]) -> None:
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    saved = yaml.safe_load(path.read_text())
    for key, want in settings.items():
        node = saved
        for part in key.split("."):
            node = node[part]
        assert str(node) == str(want), f"config.yaml has {key}={node}; the run trains with {want}"


def test_at_the_end(run_dir: Path, ever_finished: bool, steps: int, finished: bool) -> None:
    """The test split is evaluated at the run's end only, once: never before the run first finishes, only
    at its last step, and a run that finished holds it with the ``finished`` event it ends with (a finished
    run rerun does not test again; one whose final checkpoint a user destroyed resumes earlier, which voids
    that test, and tests again when it reaches its end again; one killed between its test and its
    ``finished`` event tests again when rerun, and that test replaces the first)."""
    if not (run_dir / "metrics.jsonl").exists():
        return
    history = kept_records(run_dir / "metrics.jsonl", events=True)
    tests = [m for m in history if is_test_record(m)]
    ends = [m for m in history if m.get("event") == "finished"]
    assert ever_finished or not tests, f"{len(tests)} test evaluations before the run first finished"
    assert all(m["step"] == steps for m in tests), f"a test evaluation before the end: {[m['step'] for m in tests]}"
    assert len(tests) <= 1, f"the test split evaluated {len(tests)} times"
    assert len(ends) <= len(tests), f"{len(tests)} test evaluations, {len(ends)} finished events"
    assert not finished or len(tests) == len(ends) == 1, f"a finished run: {len(tests)} tests, {len(ends)} ends"


def same_as_uninterrupted(run_dir: Path, reference: dict[str, torch.Tensor], exact: bool) -> None:
    found = checkpoint.CheckpointManager(run_dir).find_latest()
    assert found is not None, "a finished run has no intact checkpoint"
    state = torch.load(found, weights_only=True)
    for name, want in reference.items():
        got = state["model"][name]
        if exact:
            assert torch.equal(got, want), f"parameter {name} differs from the uninterrupted run's"
        else:
            gap = float((got - want).abs().max())
            assert gap < 1e-5, f"parameter {name} differs from the uninterrupted run's by {gap:.3g}"


def validations(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/loss) of each validation the run's kept records hold (a resume voids the ones past it)."""
    return [(m["step"], m["val/loss"]) for m in kept_records(run_dir / "metrics.jsonl") if "val/loss" in m]


def validated_as_uninterrupted(run_dir: Path, reference: list[tuple[int, float]], two_ranks: bool) -> None:
    """Losses to 1e-5 relative on one process (a safe setting, eval.batch_size, sums the same numbers in
    another order), 1e-3 once two ranks took part (parameters 1e-5 apart)."""
    got = validations(run_dir)
    steps, want_steps = [s for s, _ in got], [s for s, _ in reference]
    assert steps == want_steps, f"validations at steps {steps}; the uninterrupted run's: {want_steps}"
    tolerance = 1e-3 if two_ranks else 1e-5
    for (step, loss), (_, want) in zip(got, reference, strict=True):
        assert math.isclose(loss, want, rel_tol=tolerance), (
            f"validation at step {step}: loss {loss}, uninterrupted {want}"
        )
