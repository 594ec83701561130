"""What a checkpoint must share with the config to resume: the task's data, in one line when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnddp.config import load_config, to_dict
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.tasks import TASKS

PATH = Path("runs/x/checkpoints/step_0000010.pt")


def _state(*overrides: str) -> dict:
    cfg = load_config(list(overrides))
    task = TASKS[cfg.task](cfg, DistInfo())
    return {"config": to_dict(cfg), **task.state_dict()}


def _check(state: dict, *overrides: str) -> None:
    cfg = load_config(list(overrides))
    TASKS[cfg.task](cfg, DistInfo()).check_resume(state, PATH)


@pytest.mark.parametrize(
    "saved, now, key",
    [
        # rows and columns both give 28 features per step: only this check tells them apart
        (["data.view=rows"], ["data.view=columns"], "data.view"),
        (["data.dataset=mnist"], ["data.dataset=kmnist"], "data.dataset"),
        (["data.val_size=5000"], ["data.val_size=0"], "data.val_size"),
        (["train.global_batch_size=128"], ["train.global_batch_size=256"], "train.global_batch_size"),
        (
            ["task=sine_regression", "sine.chunk_len=10"],
            ["task=sine_regression", "sine.chunk_len=20"],
            "sine.chunk_len",
        ),
        (["task=sine_regression"], ["task=sine_regression", "sine.val_sequences=64"], "sine.val_sequences"),
    ],
)
def test_another_data_setting_is_refused_naming_the_key(saved, now, key):
    with pytest.raises(UserError, match=f"was trained with {key}=") as e:
        _check(_state(*saved), *now)
    assert "\n" not in str(e.value) and f"set {key}=" in str(e.value)


def test_another_pixel_permutation_is_refused():
    state = _state("data.view=permuted_pixels", "data.permutation_seed=1")
    with pytest.raises(UserError, match="used another pixel permutation; set data.permutation_seed=1"):
        _check(state, "data.view=permuted_pixels", "data.permutation_seed=2")
    _check(state, "data.view=permuted_pixels", "data.permutation_seed=1")  # the same order resumes


def test_the_same_settings_resume():
    _check(_state("data.view=columns"), "data.view=columns", "optim.lr=0.1")  # other optimiser settings may change
    _check(_state("task=sine_regression"), "task=sine_regression")
