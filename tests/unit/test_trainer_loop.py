"""The generic loop in-process: a stop request on the last step finishes the run instead of stopping it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from rnnddp.preemption import StopRequest
from tests.conftest import in_process_trainer


def _requested() -> StopRequest:
    stop = StopRequest([])  # no handlers: the flag is set by hand, as a signal would set it
    stop.signum = signal.SIGTERM
    return stop


def test_a_stop_request_before_the_last_step_stops_with_a_checkpoint(tmp_path: Path, mnist_root):
    trainer = in_process_trainer(mnist_root, tmp_path, ["model.hidden_size=8", "train.max_steps=3"])
    trainer.stop, trainer._owns_stop = _requested(), False
    assert trainer.fit() == "stopped" and trainer.global_step == 1  # one process: at the next step


def test_a_stop_request_on_the_last_step_finishes_the_run(tmp_path: Path, mnist_root):
    trainer = in_process_trainer(mnist_root, tmp_path, ["model.hidden_size=8", "train.max_steps=1"])
    trainer.stop, trainer._owns_stop = _requested(), False
    assert trainer.fit() == "finished" and trainer.global_step == 1 and trainer.last_eval  # validated, not stopped


def test_a_second_ctrl_c_interrupts_at_once():
    stop = StopRequest(["SIGINT", "SIGTERM"])
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a clean stop: a flag, nothing raised
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second interrupts (the entry point exits 130)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_nonfinite_losses_under_a_grad_scaler_are_divergence_not_a_finished_run(tmp_path: Path, mnist_root):
    """fp16 (or bf16 on CUDA) trains under a GradScaler, which skips a step whose gradients are not finite;
    a run of losses that stay NaN is still divergence (exit 3), never a run that "finishes" untrained."""
    import torch

    from rnnddp.errors import NonFiniteLossError

    overrides = ["model.hidden_size=8", "train.max_steps=12", "train.log_every_steps=4", "debug.nonfinite_from_step=2"]
    trainer = in_process_trainer(mnist_root, tmp_path, overrides)
    trainer.scaler = trainer.step.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as on a GPU under fp16
    with pytest.raises(NonFiniteLossError, match="loss was not finite for 3 consecutive steps"):
        trainer.fit()
    assert trainer.global_step == 4
