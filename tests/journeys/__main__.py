"""Walk random journeys for a while: ``python -m tests.journeys --minutes 60 [--seed S] [--steps N]``.

Each batch of journeys runs under one seed (printed first, so a failure replays with ``--seed``);
Hypothesis shrinks a failing journey to a shortest one and prints its steps. Prints, at the end:
journeys, actions, distinct action pairs (of those possible), the tasks drawn, and the violations.
Exit status 1 if any promise broke.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback

from hypothesis import HealthCheck, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.journeys.machine import STATS, Journey

ACTIONS = ("run", "stop", "kill", "rerun_safe", "rerun_unsafe", "two_ranks", "damage_flip", "damage_truncate",
           "delete_latest", "evaluate", "predict")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, help="the first batch's seed (default: drawn, and printed)")
    p.add_argument("--steps", type=int, default=12, help="actions per journey, at most")
    p.add_argument("--batch", type=int, default=5, help="journeys per seed")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    end = time.monotonic() + 60 * a.minutes
    violations: list[tuple[int, str]] = []
    batches = 0
    while time.monotonic() < end:
        s = a.seed if a.seed is not None and batches == 0 else rng.randrange(2**32)
        batches += 1
        print(f"batch {batches}: seed {s}", flush=True)
        config = settings(
            max_examples=a.batch,
            stateful_step_count=a.steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        try:
            run_state_machine_as_test(seed(s)(Journey), settings=config)
        except Exception as e:  # a broken promise: record it, go on walking
            violations.append((s, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
    possible = len(ACTIONS) * len(ACTIONS)
    seen = {pair for pair in STATS.pairs if pair[0] is not None}
    print(f"\n{a.minutes:g} minutes: {batches} seeds, {STATS.journeys} journeys, {sum(STATS.actions.values())} actions")
    print(f"distinct action pairs: {len(seen)} of {possible}")
    print("actions: " + ", ".join(f"{k} {v}" for k, v in STATS.actions.most_common()))
    print("tasks: " + ", ".join(f"{k} {v}" for k, v in STATS.tasks.most_common()))
    print(f"violations: {len(violations)}")
    for s, what in violations:
        print(f"  seed {s}: {what.splitlines()[0][:300]}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
