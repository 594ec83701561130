"""Random user journeys through one run directory's life, as a Hypothesis state machine.

A journey draws a task (digits by rows on MNIST, the sine regressor with its carried state, prepared
sequences, a character language model), each on a tiny model whose run is 8 or 9 steps, then acts as
a user does, in any order: run it; stop it with SIGTERM, SIGUSR1 or SIGINT after any step (the
first, an epoch's last, the run's last); SIGKILL it after any step or at any moment (start-up, inside a step, a save, validation, the final
test); rerun with a safe setting
changed (kept) or an unsafe one (refused once a checkpoint exists); rerun on two torchrun ranks;
flip bytes in or truncate the newest checkpoint; delete ``latest``; evaluate; predict. After every
action the promises of tests/journeys/promises.py are checked. Failures shrink to a shortest journey.

One-rank runs, stops, evaluate and predict run in this process (``rnnddp.job.run``: the job's own
code, its signal handlers catching a real signal); a SIGKILL and two ranks are real processes
(train_ddp.py, torchrun over gloo). W&B is on, offline, as a user without a key has it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rnnddp import checkpoint
from rnnddp.config import load_config
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.job import run as run_job_in_process
from rnnddp.metrics import is_test_record, kept_records
from rnnddp.tasks import TASKS
from tests.conftest import DATA_ROOT, REPO, job_cmd, job_env, run_job
from tests.journeys import promises
from tests.sequence_files import tiny_prepared

SAFE_CHANGES = ("checkpoint.every_steps=1", "checkpoint.keep=1", "eval.batch_size=5", "dist.timeout_s=120")
UNSAFE_CHANGES = ("model.hidden_size=12", "optim.lr=0.02", "seed=9", "train.global_batch_size=16")


@dataclass
class Task:
    name: str
    args: list[str]
    predict_file: Path | None  # a file rnnddp-predict takes (None: the task refuses predict)
    plans: dict[tuple[str, ...], tuple[int, int]] = field(default_factory=dict)
    timing: tuple[float, float] | None = None  # a launch's seconds to its first step, and from there to its exit

    def plan(self, settings: tuple[str, ...] = ()) -> tuple[int, int]:
        """(the run's optimiser steps, steps per epoch) with these settings (a batch size changes both)."""
        if settings not in self.plans:
            cfg = load_config([*self.args, *settings])
            task = TASKS[cfg.task](cfg, DistInfo())
            per_epoch = task.train_batches(task.load().train).steps_per_epoch
            self.plans[settings] = (min(cfg.train.max_steps or 10**9, cfg.train.epochs * per_epoch), per_epoch)
        return self.plans[settings]

    def edges(self, settings: tuple[str, ...] = ()) -> list[int]:
        """The steps where a stop or a kill is likeliest to go wrong: the first, each epoch's last, the run's last."""
        steps, per_epoch = self.plan(settings)
        return sorted({1, steps, *range(per_epoch, steps + 1, per_epoch)})


@dataclass
class Stats:
    """What the journeys covered (the long run prints it)."""

    journeys: int = 0
    actions: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)  # the edges a journey reached (the suite's run needs some)


STATS = Stats()
_REFERENCES: dict[tuple, Reference] = {}
_DATA: dict[str, Task] = {}


def data_root() -> Path:
    root = Path(tempfile.gettempdir()) / f"rnnddp-journeys-{os.getpid()}"
    root.mkdir(exist_ok=True)
    return root


def make_task(name: str) -> Task:
    """The task's tiny data (made once per process) and its arguments: runs of 8 or 9 steps."""
    if name in _DATA:
        return _DATA[name]
    root = data_root() / name
    root.mkdir(exist_ok=True)
    common = ["train.log_every_steps=1", "checkpoint.every_steps=3", "eval.plots=false", "model.hidden_size=8"]
    if name == "rows":  # MNIST: 8 steps inside the first epoch, validation every 4
        from PIL import Image

        Image.new("L", (28, 28), color=30).save(root / "digit.png")
        args = [f"data.root={DATA_ROOT}", "data.val_size=300", "train.global_batch_size=32", "train.max_steps=8"]
        task = Task(name, [*args, "eval.every_steps=4", *common], root / "digit.png")
    elif name == "sine":  # 2 epochs of 4 chunks, the state carried
        args = ["task=sine_regression", "sine.sequences=32", "sine.val_sequences=16", "sine.test_sequences=16"]
        task = Task(name, [*args, "sine.length=40", "train.global_batch_size=32", "train.epochs=2", *common], None)
    elif name == "sequences":  # 3 epochs of 3 steps
        folder = tiny_prepared(root)
        np.save(root / "seq.npy", np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32))
        args = ["task=sequence_classification", f"sequences.path={folder}", "train.global_batch_size=8"]
        task = Task(name, [*args, "train.epochs=3", *common], root / "seq.npy")
    else:  # text: 2 epochs of 4 steps over 8 stripes, the state carried
        from rnnddp.data.text import prepare_text

        text = root / "small.txt"
        text.write_text((DATA_ROOT / "text" / "tinyshakespeare" / "input.txt").read_text()[:1300])
        if not (root / "chars").exists():
            prepare_text(text, root / "chars", "char")
        args = ["task=language_model", f"lm.path={root / 'chars'}", "lm.bptt=32", "lm.emb_size=8", "lm.eval_stripes=2"]
        opt = ["optim.name=sgd", "optim.lr=1.0"]
        task = Task(name, [*args, "train.global_batch_size=8", "train.epochs=2", *opt, *common], None)
    _DATA[name] = task
    return task


def quiet_run(argv: list[str]) -> int:
    """The job on one process in this one, as train_ddp.py runs it: its exit code (UserError: 2)."""
    torch.set_num_threads(1)  # as the launched jobs (OMP_NUM_THREADS=1): the same sums, bit for bit
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return run_job_in_process(load_config(argv), DistInfo())
    except UserError:
        return 2


def metrics_size(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return f.stat().st_size if f.exists() else 0


def launch_killed(argv: list[str], run_dir: Path, before_first: float, after_first: float) -> tuple[int, float, float]:
    """train_ddp.py on one process, SIGKILLed ``before_first`` s after its launch or ``after_first`` s after it
    first logs a step (metrics.jsonl grows), whichever comes first (inf: never).

    Returns (exit code, seconds to its first step, seconds in all)."""
    size = metrics_size(run_dir)
    start = time.monotonic()
    proc = subprocess.Popen(
        job_cmd(argv), env=job_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = math.inf
    deadline = start + before_first
    while proc.poll() is None and time.monotonic() < deadline:
        if first == math.inf and metrics_size(run_dir) > size:
            first = time.monotonic() - start
            deadline = min(deadline, time.monotonic() + after_first)
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)  # the job alone, as ``kill -9 PID``: W&B's service outlives it
    code = proc.wait(timeout=600)
    return code, first, time.monotonic() - start


@dataclass(frozen=True)
class Reference:
    """What an uninterrupted one-process run with a journey's settings ends with."""

    parameters: dict[str, torch.Tensor]
    validations: list[tuple[int, float]]


def reference(task: Task, settings: tuple[str, ...]) -> Reference:
    """The uninterrupted one-process run with these settings (computed once)."""
    key = (task.name, settings)
    if key not in _REFERENCES:
        run_dir = Path(tempfile.mkdtemp(prefix="rnnddp-journey-ref-"))
        try:
            assert quiet_run([*task.args, *settings, f"run_dir={run_dir}", "wandb.mode=disabled"]) == 0
            found = checkpoint.CheckpointManager(run_dir).find_latest()
            params = {k: v.clone() for k, v in torch.load(found, weights_only=True)["model"].items()}
            _REFERENCES[key] = Reference(params, promises.validations(run_dir))
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return _REFERENCES[key]


class Journey(RuleBasedStateMachine):
    """One run directory; the model of what the job must have done with it so far."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="rnnddp-journey-"))
        self.run_dir = self.dir / "run"
        self.settings: list[str] = []  # the unsafe keys the run trains with (set by its first run)
        self.finished = False  # the newest intact checkpoint is the run's end
        self.ever_finished = False
        self.two_ranks = False
        self.damaged = False  # the user damaged a checkpoint or latest since the last run
        self.stopped_at_epoch_end = False
        self.last: str | None = None
        STATS.journeys += 1

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model ------------------------------------------------------------------------------
    def argv(self, *extra: str) -> list[str]:
        return [*self.task.args, *self.settings, f"run_dir={self.run_dir}", "wandb.mode=offline", *extra]

    def step(self) -> int:
        """The step the next run resumes from: the newest intact checkpoint's (0 when none)."""
        found = checkpoint.CheckpointManager(self.run_dir).find_latest() if self.run_dir.exists() else None
        return int(torch.load(found, weights_only=True)["global_step"]) if found else 0

    def count(self, action: str) -> None:
        STATS.actions[action] += 1
        STATS.pairs[(self.last, action)] += 1
        self.last = action

    def act(self, action: str, code_of: Any, predicted: int | None, changes: list[str] | None = None) -> int:
        self.count(action)
        before = promises.snapshot(self.run_dir)
        fresh = self.step() == 0  # no intact checkpoint: a job action starts the run over
        code = code_of()
        after = promises.snapshot(self.run_dir)
        promises.exit_code(action, code, predicted)
        promises.refusal_wrote_nothing(code, before, after)
        if action not in ("evaluate", "predict"):
            if code != 2:  # a job that ran points latest at its own checkpoint; a refusal writes nothing
                self.damaged = False
            if code != 2 and changes is not None:
                self.settings = changes
            if fresh and code != 2:
                self.ever_finished = self.stopped_at_epoch_end = False
            if code == 0:
                self.finished = self.ever_finished = True
                if self.stopped_at_epoch_end:
                    STATS.events["finished after a stop on an epoch's last step"] += 1
            if self.step() > 0:
                STATS.events["a checkpoint written"] += 1
        return code

    # -- actions --------------------------------------------------------------------------------
    @initialize(name=st.sampled_from(["sequences", "sine", "rows", "text"]))
    def choose_task(self, name: str) -> None:
        self.task = make_task(name)
        STATS.tasks[name] += 1

    @rule()
    def run(self) -> None:
        self.act("run", lambda: quiet_run(self.argv()), 0)

    def draw_step(self, data: st.DataObject) -> int:
        """A step after which to act: often an edge, otherwise any step of the run (or one past its end)."""
        edges, steps = self.task.edges(tuple(self.settings)), self.steps()
        return data.draw(st.one_of(st.sampled_from(edges), st.integers(1, steps + 1)))

    def steps(self) -> int:
        return self.task.plan(tuple(self.settings))[0]

    # One rule per signal: Hypothesis picks among the rules about evenly (and the first one, by its order, a
    # third of the time: ``run``), so three stop rules make stops, the richest action, about a fifth of all.
    @rule(data=st.data())
    def stop_term(self, data: st.DataObject) -> None:
        self.stop(data, "SIGTERM")

    @rule(data=st.data())
    def stop_usr1(self, data: st.DataObject) -> None:
        self.stop(data, "SIGUSR1")

    @rule(data=st.data())
    def stop_int(self, data: st.DataObject) -> None:
        self.stop(data, "SIGINT")

    def stop(self, data: st.DataObject, signal: str) -> None:
        at = self.draw_step(data)
        now = self.step()
        predicted = 75 if now < at < self.steps() and not self.finished else 0
        code = self.act(
            "stop",
            lambda: quiet_run(self.argv(f"debug.stop_at_step={at}", f"train.stop_signals=[{signal}]")),
            predicted,
        )
        if code == 75:
            assert self.step() == at, f"stopped after step {at}, the newest checkpoint is at {self.step()}"
            self.finished = False
            if at % self.task.plan(tuple(self.settings))[1] == 0:
                STATS.events["a stop on an epoch's last step"] += 1
                self.stopped_at_epoch_end = True

    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        at = self.draw_step(data)
        now = self.step()
        predicted = -9 if now < at <= self.steps() and not self.finished else 0

        def killed() -> int:
            proc = run_job(self.argv(f"debug.fail_at_step={at}"), nproc=1, check=False)
            return proc.returncode

        code = self.act("kill", killed, predicted)
        if code == -9:
            self.finished = False

    @rule(percent=st.integers(0, 120))  # integers: floats draw subnormals, which torch's flush-to-zero breaks
    def kill_anytime(self, percent: int) -> None:
        """SIGKILL at a drawn moment of a launched run, not only between steps: during start-up (``percent``
        below 20), or in the time a whole run takes after its first step (in a step, a save, validation,
        the final test, while W&B writes), or after it has ended."""
        timing, moment = self.task.timing or self.calibrate(), percent / 100
        if moment < 0.2:
            before, after = moment / 0.2 * timing[0], math.inf
        else:
            before, after = math.inf, (moment - 0.2) * timing[1]
        code = self.act("kill_anytime", lambda: launch_killed(self.argv(), self.run_dir, before, after)[0], None)
        if code == -9:
            self.finished = False
            if self.reached_end():  # killed after its final test (the user cannot tell it from a finished run)
                self.ever_finished = True
            STATS.events["a kill at a drawn moment" + (" in start-up" if moment < 0.2 else " after a step")] += 1

    def reached_end(self) -> bool:
        """The run's kept records hold a final test (it may have been killed before its ``finished`` event)."""
        path = self.run_dir / "metrics.jsonl"
        return path.exists() and any(is_test_record(r) for r in kept_records(path))

    def calibrate(self) -> tuple[float, float]:
        """A whole uninterrupted launch of the task, timed (once per task and process)."""
        scratch = Path(tempfile.mkdtemp(prefix="rnnddp-journey-timing-"))
        try:
            argv = [*self.task.args, f"run_dir={scratch / 'run'}", "wandb.mode=offline"]
            code, first, total = launch_killed(argv, scratch / "run", math.inf, math.inf)
            assert code == 0 and first < math.inf, f"an uninterrupted launch exited {code}"
            self.task.timing = (first, total - first)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self.task.timing

    @rule(change=st.sampled_from(SAFE_CHANGES))
    def rerun_safe(self, change: str) -> None:
        self.act("rerun_safe", lambda: quiet_run(self.argv(change)), 0)

    @rule(change=st.sampled_from(UNSAFE_CHANGES))
    def rerun_unsafe(self, change: str) -> None:
        refused = self.step() > 0 and change not in self.settings  # the run's own setting again is no change
        if self.act("rerun_unsafe", lambda: quiet_run(self.argv(change)), 2 if refused else 0, [change]) == 2:
            STATS.events["an unsafe rerun refused"] += 1

    @rule()
    def two_ranks(self) -> None:
        self.act("two_ranks", lambda: run_job(self.argv(), nproc=2, check=False).returncode, 0)
        self.two_ranks = True

    @precondition(lambda self: self.step() > 0)
    @rule(how=st.sampled_from(["flip", "truncate", "delete_latest"]))
    def damage(self, how: str) -> None:
        """The user's damage: bytes flipped in or the tail cut off the newest checkpoint, or ``latest`` deleted."""
        self.damaged = True
        if how == "delete_latest":
            (self.run_dir / "checkpoints" / "latest").unlink(missing_ok=True)
            self.count("delete_latest")
            return
        manager = checkpoint.CheckpointManager(self.run_dir)
        newest = manager.step_files()[0]  # newest first
        data = bytearray(newest.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        newest.write_bytes(bytes(data))
        self.finished = False
        self.count("damage_" + how)

    # One rule for both tools: Hypothesis draws each rule about as often as any other (see ``stop_term``),
    # and these two tell least about the run.
    @rule(tool=st.sampled_from(["evaluate", "predict"]))
    def use(self, tool: str) -> None:
        """rnnddp-evaluate or rnnddp-predict on the run directory (the task's own input file for predict)."""
        if tool == "evaluate":
            self.evaluate()
        else:
            self.predict()

    def evaluate(self) -> None:
        from rnnddp.evaluate import main as evaluate

        def code() -> int:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return evaluate([str(self.run_dir), "--no-plots"])

        self.act("evaluate", code, 0 if self.step() > 0 else 2)

    def predict(self) -> None:
        from rnnddp.predict import main as predict

        def code() -> int:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                files = [str(self.task.predict_file)] if self.task.predict_file else [str(self.dir / "none.npy")]
                return predict([str(self.run_dir), *files])

        self.act("predict", code, 0 if self.step() > 0 and self.task.predict_file else 2)

    # -- the promises after every action -----------------------------------------------------------
    @invariant()
    def promises_hold(self) -> None:
        if not hasattr(self, "task"):
            return
        if not self.damaged:
            promises.latest_is_complete(self.run_dir)
        promises.steps_once(self.run_dir, self.steps() if self.finished else None)
        promises.config_is_the_runs(self.run_dir, dict(s.split("=", 1) for s in self.settings))
        promises.test_at_the_end(self.run_dir, self.ever_finished, self.steps(), self.finished)
        if self.finished:
            ref = reference(self.task, tuple(self.settings))
            promises.same_as_uninterrupted(self.run_dir, ref.parameters, exact=not self.two_ranks)
            promises.validated_as_uninterrupted(self.run_dir, ref.validations, two_ranks=self.two_ranks)
