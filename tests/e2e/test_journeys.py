"""The suite's share of the journeys (tests/journeys/): one fixed seed and count, the same journeys every time.

6 journeys of up to 6 actions (seed 4: about 53 s on 2 cores). They must reach the edges the journeys
exist for, so that a change to the machine that stops reaching them fails here instead of passing
quietly: a stop on an epoch's last step resumed to the end, an unsafe rerun refused, checkpoints
written. Not shrunk here (seconds per action); ``python -m tests.journeys --seed 4 --batch 6 --steps 6``
replays and shrinks a failure.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.journeys.machine import STATS, Journey

pytestmark = pytest.mark.slow
SEED, JOURNEYS, ACTIONS = 4, 6, 6
REACHED = (
    "finished after a stop on an epoch's last step",
    "an unsafe rerun refused",
    "a checkpoint written",
)


def test_fixed_journeys_keep_every_promise(mnist_root, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    STATS.events.clear()
    config = settings(
        max_examples=JOURNEYS,
        stateful_step_count=ACTIONS,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    run_state_machine_as_test(seed(SEED)(Journey), settings=config)
    missing = [e for e in REACHED if not STATS.events[e]]
    assert not missing, f"the fixed journeys no longer reach: {missing}; pick another SEED (tests/journeys/)"
