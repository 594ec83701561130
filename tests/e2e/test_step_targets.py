"""Per-step targets end to end on 2 torchrun ranks: a class at every step and values at every step,
then rnnddp-evaluate and rnnddp-predict on .csv and .npy sequences; a mid-epoch resume on another
number of ranks continues exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnddp.data.sequences import open_prepared
from rnnddp.prepare import prepare
from tests.conftest import final_eval, latest_state, read_metrics, run_cli, run_job
from tests.e2e.test_ddp import _params_close
from tests.sequence_files import step_sequences, write_csv, write_step_files

pytestmark = pytest.mark.slow
# A one-way LSTM: each step's class or values depend on the steps before it (tests/sequence_files.py).
ARGS = ["model.cell=lstm", "model.hidden_size=32", "train.global_batch_size=32", "optim.lr=0.005",
        "train.log_every_steps=25", "eval.plots=true"]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("step_data")
    return {kind: prepare(*write_step_files(root, kind), root / kind) for kind in ("classes", "values")}


def test_a_class_at_every_step_trains_on_two_ranks_evaluates_and_predicts(folders, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["task=step_classification", f"sequences.path={folders['classes']}", "train.epochs=8"]
    run_job([*ARGS, *args, f"run_dir={run}", "wandb.mode=offline"], nproc=2)
    test = final_eval(run)["test/accuracy"]
    print(f"step_classification, 8 epochs, 2 ranks: test accuracy per step {test:.4f}")
    assert test >= 0.9  # always the most common class: about 0.4
    pads = [m["train/pad_fraction"] for m in read_metrics(run) if "train/pad_fraction" in m]
    assert pads and max(pads) < 0.1, pads
    assert (run / "plots" / "test_sequences.png").is_file() and (run / "plots" / "confusion_matrix.png").is_file()
    ev = run_cli("rnnddp.evaluate", run, "--no-plots")
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy {test:.4f}" in ev.stdout and "  high: " in ev.stdout and "steps)" in ev.stdout, ev.stdout
    # The raw features of two test sequences (the job normalises them as in training), as .npy and .csv.
    x, y = step_sequences(300, 1, "classes")
    np.save(tmp_path / "a.npy", x[0])
    write_csv(tmp_path / "b.csv", x[1], header="f0,f1,f2")
    proc = run_cli("rnnddp.predict", run, tmp_path / "a.npy", tmp_path / "b.csv")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert len(rows) == len(x[0]) + len(x[1])
    a, b = rows[: len(x[0])], rows[len(x[0]) :]
    assert [r[0] for r in a] == [str(tmp_path / "a.npy")] * len(x[0]) and [int(r[1]) for r in b] == list(
        range(len(x[1]))
    )
    predicted = [r[2] for r in a + b]
    truth = [*y[0].tolist(), *y[1].tolist()]
    assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) >= 0.8, (predicted, truth)
    assert all(0 < float(r[3]) <= 1 for r in rows)
    wrong = run_cli("rnnddp.predict", run, tmp_path / "a.npy", folders["values"] / "test.offsets.npy")
    assert wrong.returncode == 2 and wrong.stdout == "" and len(wrong.stderr.strip().splitlines()) == 1, wrong


def test_values_at_every_step_train_on_two_ranks_and_predict(folders, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["task=step_regression", f"sequences.path={folders['values']}", "train.epochs=8"]
    run_job([*ARGS, *args, f"run_dir={run}", "wandb.mode=offline"], nproc=2)
    mse = final_eval(run, "mse")["test/mse"]
    assert (run / "plots" / "test_sequences.png").is_file()
    ev = run_cli("rnnddp.evaluate", run, "--no-plots")
    assert ev.returncode == 0, ev.stderr
    baseline = float(ev.stdout.split("always predicting the train mean: ")[1].split()[0])
    print(f"step_regression, 8 epochs, 2 ranks: test mse {mse:.4f}, predicting the mean {baseline:.4f}")
    assert mse < 0.1 * baseline
    x, y = step_sequences(300, 1, "values")
    np.save(tmp_path / "a.npy", x[3])
    proc = run_cli("rnnddp.predict", run, tmp_path / "a.npy")
    assert proc.returncode == 0, proc.stderr
    got = np.array([[float(v) for v in line.split("\t")[2:]] for line in proc.stdout.strip().splitlines()])
    assert got.shape == y[3].shape and np.mean((got - y[3]) ** 2) < 0.2 * baseline


def test_a_mid_epoch_resume_on_another_number_of_ranks_continues_exactly(folders, tmp_path: Path) -> None:
    """25 steps per epoch: stop at step 10 on 2 ranks, resume on 1 to step 20; as 20 steps on 1 rank."""
    data = open_prepared(folders["classes"]).manifest["splits"]["train"]["sequences"]
    assert data // 32 > 20  # both steps are inside the first epoch
    args = [*ARGS, "task=step_classification", f"sequences.path={folders['classes']}", "sched.name=constant",
            "wandb.mode=disabled", "train.log_every_steps=5"]  # fmt: skip
    run_job([*args, "train.max_steps=20", f"run_dir={tmp_path}/ref"], nproc=1)
    run_job([*args, "train.max_steps=10", f"run_dir={tmp_path}/mix"], nproc=2)
    proc = run_job([*args, "train.max_steps=20", f"run_dir={tmp_path}/mix"], nproc=1)
    assert "written by 2 ranks, resuming on 1" in proc.stdout + proc.stderr
    _params_close(latest_state(tmp_path / "ref"), latest_state(tmp_path / "mix"), atol=1e-5)
    ref = {m["step"]: m["train/loss"] for m in read_metrics(tmp_path / "ref") if "train/loss" in m}
    mix = {m["step"]: m["train/loss"] for m in read_metrics(tmp_path / "mix") if "train/loss" in m}
    assert ref.keys() == mix.keys() == {5, 10, 15, 20}
    for step in ref:  # the 2-rank steps report the mean over the global batch's steps too
        assert mix[step] == pytest.approx(ref[step], rel=1e-4), (step, ref, mix)
