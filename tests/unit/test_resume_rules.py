"""What a checkpoint must share with the config to resume (rnnddp/resume.py): every key but the safe ones,
each difference refused in one line naming the key, both values and the two fixes; the run's length may grow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rnnddp import resume
from rnnddp.config import load_config, to_dict
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.metrics import event_line
from rnnddp.tasks import TASKS

PATH = Path("runs/x/checkpoints/step_0000010.pt")
SPE = 100  # steps per epoch


def _state(*overrides: str) -> dict:
    cfg = load_config(list(overrides))
    task = TASKS[cfg.task](cfg, DistInfo())
    return {"config": to_dict(cfg), **task.state_dict()}


def _compare(state: dict, *overrides: str) -> resume.Changes:
    cfg = load_config(list(overrides))
    task = TASKS[cfg.task](cfg, DistInfo())
    task.check_resume(state, PATH)
    return resume.compare(state["config"], cfg, PATH, task.RESUME_SAFE, SPE)


@pytest.mark.parametrize(
    "saved, now, key",
    [
        # rows and columns both give 28 features per step: only this check tells them apart
        (["data.view=rows"], ["data.view=columns"], "data.view"),
        (["data.dataset=mnist"], ["data.dataset=kmnist"], "data.dataset"),
        (["data.val_size=5000"], ["data.val_size=0"], "data.val_size"),
        (["train.global_batch_size=128"], ["train.global_batch_size=256"], "train.global_batch_size"),
        (["optim.lr=0.005"], ["optim.lr=0.5"], "optim.lr"),
        (["sched.name=onecycle"], ["sched.name=cosine"], "sched.name"),
        (["seed=0"], ["seed=1"], "seed"),
        (["train.epochs=4"], ["train.epochs=2"], "train.epochs"),  # shortened: the schedule would change shape
        (["model.dropout=0.0"], ["model.dropout=0.1"], "model.dropout"),
        (
            ["task=sine_regression", "sine.chunk_len=10"],
            ["task=sine_regression", "sine.chunk_len=20"],
            "sine.chunk_len",
        ),
        (
            ["task=sine_regression", "sine.val_sequences=256"],
            ["task=sine_regression", "sine.val_sequences=64"],
            "sine.val_sequences",
        ),
    ],
)
def test_another_setting_is_refused_naming_the_key_both_values_and_both_fixes(saved, now, key):
    with pytest.raises(UserError, match=f"was trained with {key}=") as e:
        _compare(_state(*saved), *now)
    message = str(e.value)
    before, after = saved[-1].split("=")[1], now[-1].split("=")[1]
    assert "\n" not in message
    assert f"{key}={before}, the config says {after}" in message
    assert f"set {key}={before} to resume that run, or start a new run with name=NEW" in message


def test_several_changes_are_named_in_the_one_line():
    with pytest.raises(UserError) as e:
        _compare(_state(), "optim.lr=0.1", "model.hidden_size=64", "seed=5")
    assert "(also changed: " in str(e.value) and "\n" not in str(e.value)
    for key in ("optim.lr", "model.hidden_size", "seed"):
        assert key in str(e.value)


def test_safe_settings_are_applied_and_reported():
    changes = _compare(
        _state(),
        "eval.every_steps=7",
        "checkpoint.keep=5",
        "wandb.mode=disabled",
        "dist.timeout_s=60",
        "train.log_every_steps=10",
        "train.precision=bf16",
        "data.root=/elsewhere",
        "name=renamed",
        "run_dir=runs/default",
    )
    assert changes.applied["eval.every_steps"] == (0, 7)
    assert changes.applied["data.root"] == ("data", "/elsewhere")
    assert "name" in changes.applied and not changes.extends
    assert "eval.every_steps 0 -> 7" in changes.describe()


def test_the_same_settings_resume_with_no_change():
    assert not _compare(_state("data.view=columns"), "data.view=columns").applied
    assert not _compare(_state("task=sine_regression"), "task=sine_regression").applied


def test_a_longer_run_is_an_extension_and_an_equal_length_is_no_change():
    changes = _compare(_state("train.epochs=4"), "train.epochs=6")
    assert changes.extends and (changes.old_total, changes.new_total) == (4 * SPE, 6 * SPE)
    with pytest.raises(UserError, match="never shortened: 400 steps, now 250"):
        _compare(_state("train.epochs=4"), "train.max_steps=250")
    # A cap that does not bite changes nothing.
    changes = _compare(_state("train.epochs=4"), "train.max_steps=1000")
    assert not changes.extends and changes.new_total == changes.old_total == 400


def test_another_pixel_permutation_is_refused():
    state = _state("data.view=permuted_pixels", "data.permutation_seed=1")
    with pytest.raises(UserError, match="permutation"):
        _compare(state, "data.view=permuted_pixels", "data.permutation_seed=2")
    _compare(state, "data.view=permuted_pixels", "data.permutation_seed=1")  # the same order resumes


def test_an_older_checkpoints_config_takes_the_defaults_of_keys_added_since():
    state = _state()
    del state["config"]["dist"]["max_stalled_restarts"], state["config"]["debug"]["stop_at_step"]
    assert not _compare(state).applied


# -- restarts without progress ------------------------------------------------------------------


def _starts(path: Path, *records: tuple[int, bool]) -> None:
    path.write_text("".join(event_line("start", step, automatic=auto) for step, auto in records))


def test_stalled_attempts_count_back_to_the_last_start_by_hand(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    _starts(metrics, (0, False), (40, True), (40, False), (40, True), (40, True))
    assert resume.stalled_attempts(metrics, 40) == 3  # the hand start at 40 and the two restarts after it
    assert resume.stalled_attempts(metrics, 60) == 0  # progress: a newer checkpoint
    _starts(metrics, (20, True), (40, True))
    assert resume.stalled_attempts(metrics, 40) == 1
    assert resume.stalled_attempts(tmp_path / "none.jsonl", 0) == 0


def test_an_automatic_restart_after_the_limit_stops_with_one_line_and_a_hand_rerun_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    metrics = tmp_path / "metrics.jsonl"
    _starts(metrics, (40, False), (40, True), (40, True))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(UserError, match=r"^3 attempts in a row started from step 40 .* without saving a newer"):
        resume.check_progress(tmp_path, 40, 3, DistInfo(), PATH)
    assert json.loads(metrics.read_text().splitlines()[-1])["event"] == "gave_up"  # train.sbatch does not requeue
    resume.check_progress(tmp_path, 40, 0, DistInfo(), PATH)  # 0: no limit
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    resume.check_progress(tmp_path, 40, 3, DistInfo(), PATH)  # by hand: always goes on
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["event"] == "start" and last["automatic"] is False


def test_a_lengthened_run_takes_its_next_step_at_the_longer_schedules_lr(tmp_path: Path, mnist_root: Path):
    from rnnddp.train.optim import lr_factor
    from tests.conftest import in_process_trainer

    short = in_process_trainer(mnist_root, tmp_path, ["model.hidden_size=8", "train.max_steps=4"])
    short.fit()
    state = short.state_dict()
    longer = in_process_trainer(mnist_root, tmp_path, ["model.hidden_size=8", "train.max_steps=8"])
    longer.load_state_dict(state)
    sched = load_config([]).sched
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.005 * lr_factor(4, 8, sched), rel=1e-12)
    assert longer.optimizer.param_groups[0]["lr"] != pytest.approx(0.005 * lr_factor(4, 4, sched), rel=1e-3)
    same = in_process_trainer(mnist_root, tmp_path, ["model.hidden_size=8", "train.max_steps=4"])
    same.load_state_dict(state)  # the same length: the very LR the run had
    assert same.optimizer.param_groups[0]["lr"] == short.optimizer.param_groups[0]["lr"]
