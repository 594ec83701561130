"""Walk random journeys for a while: ``python -m tests.journeys --minutes 60 [--seed S] [--steps N]``.

``--mutant NAME`` (a name in tests/mutants.py) walks them in a scratch copy with that mutant applied and
stops at the first broken promise, unshrunk, printing how long finding it took (exit 1: found, 0: not found).

Each batch of journeys runs under one seed (printed first, so a failure replays with ``--seed``);
Hypothesis shrinks a failing journey to a shortest one and prints its steps. Prints, at the end:
journeys, actions, distinct action pairs (of those possible), the tasks drawn, and the violations.
Exit status 1 if any promise broke.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.journeys.machine import STATS, Journey

ACTIONS = ("run", "stop", "kill", "kill_anytime", "rerun_safe", "rerun_unsafe", "two_ranks", "damage_flip", "damage_truncate",
           "delete_latest", "evaluate", "predict")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, help="the first batch's seed (default: drawn, and printed)")
    p.add_argument("--steps", type=int, default=12, help="actions per journey, at most")
    p.add_argument("--batch", type=int, default=5, help="journeys per seed")
    p.add_argument("--first", action="store_true", help="stop at the first broken promise")
    p.add_argument("--no-shrink", action="store_true", help="report a broken promise as found, without shrinking it")
    p.add_argument("--mutant", help="walk a scratch copy with this mutant (tests/mutants.py) applied")
    a = p.parse_args(argv)
    if a.mutant:
        return walk_mutant(a.mutant, a.minutes, a.seed)
    os.environ.setdefault("WANDB_SILENT", "true")
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
            phases=[Phase.explicit, Phase.reuse, Phase.generate] if a.no_shrink else list(Phase),
        )
        try:
            run_state_machine_as_test(seed(s)(Journey), settings=config)
        except Exception as e:  # a broken promise: record it, go on walking
            violations.append((s, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
            if a.first:
                break
    possible = len(ACTIONS) * len(ACTIONS)
    seen = {pair for pair in STATS.pairs if pair[0] is not None}
    print(f"\n{a.minutes:g} minutes: {batches} seeds, {STATS.journeys} journeys, {sum(STATS.actions.values())} actions")
    print(f"distinct action pairs: {len(seen)} of {possible}")
    print("actions: " + ", ".join(f"{k} {v}" for k, v in STATS.actions.most_common()))
    print("tasks: " + ", ".join(f"{k} {v}" for k, v in STATS.tasks.most_common()))
    print("edges reached: " + ", ".join(f"{k} {v}" for k, v in STATS.events.most_common()))
    print(f"violations: {len(violations)}")
    for s, what in violations:
        print(f"  seed {s}: {what.splitlines()[0][:300]}")
    return 1 if violations else 0


def walk_mutant(name: str, minutes: float, first_seed: int | None) -> int:
    from tests.mutants import DATA_ROOT, MUTANTS, apply, scratch_copy

    mutant = next((m for m in MUTANTS if m.name == name), None)
    if mutant is None:
        print(f"no mutant {name!r}; python -m tests.mutants --list", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix=f"rnnddp-journeys-{name}-") as tmp:
        root = Path(tmp)
        scratch_copy(root)
        apply(mutant, root)
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "RNNDDP_TEST_DATA": os.environ.get("RNNDDP_TEST_DATA", str(DATA_ROOT)),
        }
        # Time to the first broken promise: shrinking it (minutes, for a journey of many actions) is not finding it.
        cmd = [sys.executable, "-m", "tests.journeys", "--minutes", str(minutes), "--first", "--no-shrink"]
        cmd += ["--seed", str(first_seed)] if first_seed is not None else []
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=root, env=env, text=True, capture_output=True)
        took = time.monotonic() - start
    found = proc.returncode == 1
    print(proc.stdout[-4000:])
    print(f"mutant {name}: {'found' if found else 'NOT found'} after {took:.0f} s")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
