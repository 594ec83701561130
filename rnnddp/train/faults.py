"""Fault injection for tests (``debug.*``): a rank SIGKILLed or signalled after a step, a loss that turns NaN."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("rnnddp")


def kill_after_step(fail_at_step: int, fail_rank: int, rank: int) -> Callable[[int], None] | None:
    """A per-step hook that SIGKILLs this rank after step ``fail_at_step``, on torchrun's first attempt only
    (TORCHELASTIC_RESTART_COUNT unset or 0), so a restart can recover; None when not asked for."""
    if not fail_at_step or rank != fail_rank:
        return None

    def hook(step: int) -> None:
        if step == fail_at_step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            log.error("debug.fail_at_step: killing rank %d at step %d", rank, step)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def nan_from_step(loss_fn: Callable[[Any], torch.Tensor], from_step: int, current_step: Callable[[], int]):
    """``loss_fn`` whose loss is NaN from optimiser step ``from_step`` on (1-based), to test divergence handling."""
    if not from_step:
        return loss_fn

    def poisoned(batch: Any) -> torch.Tensor:
        loss = loss_fn(batch)
        return loss * float("nan") if current_step() + 1 >= from_step else loss

    return poisoned


def stop_after_step(
    stop_at_step: int, fail_rank: int, rank: int, stop_signals: list[str]
) -> Callable[[int], None] | None:
    """A per-step hook that sends this rank the first of ``stop_signals`` after step ``stop_at_step`` (a real
    signal, as a scheduler sends it), on every attempt; None when not asked for."""
    if not stop_at_step or rank != fail_rank or not stop_signals:
        return None
    sig = signal.Signals[str(stop_signals[0])]

    def hook(step: int) -> None:
        if step == stop_at_step:
            log.warning("debug.stop_at_step: sending %s to rank %d after step %d", sig.name, rank, step)
            os.kill(os.getpid(), sig)

    return hook


def pace(step_delay_s: float) -> Callable[[int], None] | None:
    """A per-step hook that sleeps ``step_delay_s`` after each step; None when not asked for."""
    if step_delay_s <= 0:
        return None

    def hook(step: int) -> None:
        time.sleep(step_delay_s)

    return hook
