"""Weight averaging (rnnddp/train/averaging.py): the EMA and NT-ASGD averages themselves, validation, best.pt and
the final test on them, restore() loading them, and a stopped run that resumes bit-equal, averages included.

The sine task needs no data and carries its hidden state from step to step: 8 steps per epoch here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnddp import resume
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config, to_dict
from rnnddp.dist import DistInfo
from rnnddp.errors import EXIT_STOPPED, UserError
from rnnddp.evaluate import restore, run_evaluation
from rnnddp.job import build_trainer, run
from rnnddp.metrics import Metric
from rnnddp.preemption import StopRequest
from rnnddp.train.averaging import WeightAverage
from rnnddp.train.trainer import Trainer
from tests.conftest import latest_state, read_metrics

SINE = [
    "task=sine_regression",
    "sine.sequences=64",
    "sine.val_sequences=32",
    "sine.test_sequences=32",
    "sine.length=20",
    "sine.chunk_len=10",
    "model.hidden_size=8",
    "train.global_batch_size=16",
    "optim.lr=0.05",
    "train.log_every_steps=4",
    "checkpoint.every_steps=0",
    "wandb.mode=disabled",
    "eval.plots=false",
]
# asgd with nonmono=2: the validation results by step. Step 4 (3.5) is worse than the best so far (3) but not
# than the best before the last two (5); step 5 (4.0) only equals that best (4): the switch is at step 6.
SCRIPT = {1: 5.0, 2: 4.0, 3: 3.0, 4: 3.5, 5: 4.0, 6: 3.6, **{s: 2.0 + s / 10 for s in range(7, 13)}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: two pytest workers share the cores, and these tiny models train fastest that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(run_dir: Path, *overrides: str, writer: bool = False) -> Trainer:
    cfg = load_config([*SINE, f"run_dir={run_dir}", *overrides])
    return build_trainer(cfg, DistInfo(), CheckpointManager(run_dir, writer=writer)).trainer


def _scripted(trainer: Trainer) -> list[tuple[int, nn.Module]]:
    """Validation returns SCRIPT's value for the step; returns the (step, module) it was asked to validate."""
    asked: list[tuple[int, nn.Module]] = []

    def validate(module: nn.Module) -> dict[str, float]:
        asked.append((trainer.global_step, module))
        return {"loss": SCRIPT[trainer.global_step], "mse": SCRIPT[trainer.global_step]}

    trainer.validate = validate
    return asked


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def _weights_after_each_step(trainer: Trainer) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    trainer.hooks.append(lambda step: seen.__setitem__(step, _flat(trainer.module)))
    return seen


def test_ema_is_the_moving_average_of_the_weights_after_each_step_from_start_step(tmp_path: Path):
    decay, start = 0.6, 3
    t = _trainer(
        tmp_path, "average.mode=ema", f"average.ema_decay={decay}", f"average.start_step={start}", "train.max_steps=10"
    )
    seen = _weights_after_each_step(t)
    averaged_yet = []
    t.hooks.append(lambda step: averaged_yet.append(t.eval_module is not t.module))
    assert t.fit() == "finished"
    ema = seen[start + 1]  # the first step after start_step starts it
    for step in range(start + 2, 11):
        ema = decay * ema + (1 - decay) * seen[step]
    got = _flat(t.averaging.averaged.module)
    assert torch.allclose(got, ema, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, seen[10], rtol=1e-3, atol=1e-4)  # an average, not the last weights
    assert averaged_yet == [False] * start + [True] * (10 - start)
    assert (t.averaging.n_averaged, t.averaging.started_at) == (10 - start, start + 1)


def test_asgd_starts_when_validation_stalls_by_awd_lstms_rule_then_takes_the_plain_mean(tmp_path: Path, caplog):
    t = _trainer(tmp_path, "average.mode=asgd", "average.nonmono=2", "eval.every_steps=1", "train.max_steps=10")
    asked = _scripted(t)
    seen = _weights_after_each_step(t)
    with caplog.at_level(logging.INFO, logger="rnnddp"):
        assert t.fit() == "finished"
    assert t.averaging.started_at == 6
    assert "averaging weights from step 6 (validation stalled)" in caplog.text
    mean = torch.stack([seen[s] for s in range(6, 11)]).mean(0)  # the switch's weights and every step's after
    assert torch.allclose(_flat(t.averaging.averaged.module), mean, rtol=1e-5, atol=1e-6)
    # Validation saw the training weights up to the switch, the average after it.
    assert [s for s, m in asked if m is t.module] == [1, 2, 3, 4, 5, 6]
    assert [s for s, m in asked if m is t.averaging.averaged.module] == [7, 8, 9, 10]


def test_asgds_rule_follows_the_metrics_direction():
    higher = WeightAverage(nn.Linear(2, 1), "asgd", Metric("accuracy", higher_is_better=True), nonmono=2)
    started = [higher.on_validation(v, step) for step, v in enumerate([0.5, 0.6, 0.7, 0.65, 0.6, 0.64], 1)]
    assert started == [False] * 5 + [True] and higher.n_averaged == 1
    lower = WeightAverage(nn.Linear(2, 1), "asgd", Metric("mse", higher_is_better=False), nonmono=2)
    assert lower.module_for_eval() is lower.source  # no average yet: the training weights
    started = [lower.on_validation(v, step) for step, v in enumerate([0.5, 0.6, 0.7, 0.65, 0.6, 0.64], 1)]
    assert started == [False] * 3 + [True, False, False] and lower.started_at == 4  # 0.65 is worse than 0.5
    assert lower.module_for_eval() is lower.averaged.module


# -- a real run: validation, best.pt and the final test on the average; restore() loads it -----------------------

JOB = ["average.mode=ema", "average.ema_decay=0.8", "eval.every_steps=2", "checkpoint.every_steps=2"]
JOB += ["checkpoint.keep=100", "train.epochs=2"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ema_run")
    assert run(load_config([*SINE, *JOB, f"run_dir={run_dir}"]), DistInfo()) == 0
    return run_dir


def _evaluate(path: Path, weights: str, split: str) -> float:
    """The task's evaluation of one checkpoint's ``weights`` ("model" or "averaged_model") on ``split``."""
    r = restore(path, [])
    r.module.load_state_dict(r.state[weights])
    return r.task.evaluate(r.module, getattr(r.task.load(), split), contextlib.nullcontext())["mse"]


def test_validation_best_pt_and_the_final_test_use_the_averaged_weights(ema_run: Path):
    ckpts = ema_run / "checkpoints"
    vals = {m["step"]: m["val/mse"] for m in read_metrics(ema_run) if "val/mse" in m}
    assert sorted(vals) == list(range(2, 17, 2))
    for step, logged in vals.items():
        path = ckpts / f"step_{step:07d}.pt"
        assert _evaluate(path, "averaged_model", "val") == pytest.approx(logged, rel=1e-9, abs=0)
        assert _evaluate(path, "model", "val") != pytest.approx(logged, rel=1e-4)  # the training weights' differs
    best = torch.load(ckpts / "best.pt", weights_only=True)
    assert best["global_step"] == min(vals, key=vals.get) and best["best_metric"] == min(vals.values())
    (test,) = [m for m in read_metrics(ema_run) if "test/mse" in m]
    last = ckpts / "step_0000016.pt"
    assert _evaluate(last, "averaged_model", "test") == pytest.approx(test["test/mse"], rel=1e-9, abs=0)
    assert _evaluate(last, "model", "test") != pytest.approx(test["test/mse"], rel=1e-4)
    state = latest_state(ema_run)
    assert state["model"].keys() == state["averaged_model"].keys()  # the model's layout, for evaluate and predict
    assert state["averaging"] == {"mode": "ema", "n_averaged": 16, "started_at": 1, "history": []}


def test_restore_loads_the_averaged_weights_and_evaluate_reports_the_final_test(ema_run: Path, tmp_path: Path):
    best = ema_run / "checkpoints" / "best.pt"
    r = restore(best, [])
    for name, value in r.module.state_dict().items():
        assert torch.equal(value, r.state["averaged_model"][name]), name
    assert not all(torch.equal(v, r.state["model"][k]) for k, v in r.module.state_dict().items())
    (test,) = [m for m in read_metrics(ema_run) if "test/mse" in m]
    assert run_evaluation(ema_run / "checkpoints" / "step_0000016.pt", [])["mse"] == pytest.approx(test["test/mse"])
    # A checkpoint without an average (average.mode=none, or before averaging started) gives its model.
    state = torch.load(best, weights_only=True)
    state["averaged_model"] = None
    torch.save(state, tmp_path / "plain.pt")
    plain = restore(tmp_path / "plain.pt", [])
    assert all(torch.equal(v, state["model"][k]) for k, v in plain.module.state_dict().items())


def test_a_job_stopped_and_resumed_ends_with_the_same_averaged_weights(ema_run: Path, tmp_path: Path):
    args = [*SINE, *JOB, f"run_dir={tmp_path}"]
    assert run(load_config([*args, "debug.stop_at_step=5"]), DistInfo()) == EXIT_STOPPED
    assert latest_state(tmp_path)["global_step"] == 5
    assert run(load_config(args), DistInfo()) == 0
    _assert_equal(latest_state(tmp_path), latest_state(ema_run))


# -- stopped and resumed anywhere: bit-equal to the uninterrupted run ---------------------------------------------


def _saved(state: dict) -> dict:
    """What a checkpoint file gives back (a copy: the live state would keep training)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        skip = {"config", "wandb_run_id", "rng"}  # the runs' own names and folders; RNGs: the trainer's concern
        keys = set(a) - skip
        assert keys == set(b) - skip, where
        for k in keys:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _stop_after(trainer: Trainer, step: int) -> StopRequest:
    """A stop request made after ``step`` (as a signal would make it; one process: it stops there)."""
    stop = StopRequest([])

    def request(now: int) -> None:
        if now == step:
            stop.signum = signal.SIGTERM

    trainer.hooks.append(request)
    return stop


@pytest.mark.parametrize("mode", ["ema", "asgd"])
def test_a_run_stopped_before_at_or_after_the_start_resumes_bit_equal(tmp_path: Path, mode: str):
    extra = [f"average.mode={mode}", "average.nonmono=2", "average.start_step=3", "eval.every_steps=1"]

    def trainer(name: str) -> Trainer:
        t = _trainer(tmp_path / name, *extra, "train.max_steps=12", writer=True)
        _scripted(t)
        return t

    whole = trainer("whole")
    assert whole.fit() == "finished" and whole.averaging.started_at == {"ema": 4, "asgd": 6}[mode]
    expected = _saved(whole.state_dict())
    for stop_at in (3, 6, 9):  # ema starts after step 3, asgd at step 6's validation
        first = trainer(f"stop{stop_at}")
        first.stop, first._owns_stop = _stop_after(first, stop_at), False
        assert first.fit() == "stopped" and first.global_step == stop_at
        state = latest_state(tmp_path / f"stop{stop_at}")  # the checkpoint the stop wrote
        assert state["global_step"] == stop_at
        assert (state["averaged_model"] is None) == (stop_at < whole.averaging.started_at)
        second = trainer(f"resume{stop_at}")
        second.load_state_dict(state)
        assert second.fit() == "finished"
        _assert_equal(_saved(second.state_dict()), expected, f"stopped at {stop_at}")


# -- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["average.mode=swa"], "choose one of none, ema, asgd"),
        (["average.ema_decay=1.0"], "'average.ema_decay': must be in [0, 1)"),
        (["average.ema_decay=-0.1"], "'average.ema_decay': must be in [0, 1)"),
        (["average.nonmono=0"], "'average.nonmono': must be > 0"),
        (["average.start_step=-1"], "'average.start_step': must be >= 0"),
    ],
)
def test_bad_averaging_settings_are_one_line(args: list[str], needle: str):
    with pytest.raises(UserError) as e:
        load_config(args)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, saved, now", [("average.mode", "ema", "none"), ("average.ema_decay", "0.99", "0.9")])
def test_changing_the_averaging_on_resume_is_refused_in_one_line(key: str, saved: str, now: str):
    before = to_dict(load_config(["average.mode=ema", f"{key}={saved}"]))
    cfg = load_config(["average.mode=ema", f"{key}={now}"])
    with pytest.raises(UserError) as e:
        resume.compare(before, cfg, Path("run/checkpoints/step_0000010.pt"), (), 100)
    assert f"was trained with {key}={saved}, the config says {now}" in str(e.value) and "\n" not in str(e.value)


def test_asgd_needs_a_validation_split(tmp_path: Path, mnist_root: Path):
    with pytest.raises(UserError, match="average.mode=asgd starts averaging when validation stalls"):
        _trainer(tmp_path, f"data.root={mnist_root}", "task=classify", "data.val_size=0", "average.mode=asgd")
