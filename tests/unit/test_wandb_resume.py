"""After a crash, W&B (offline, real files) holds every step once: what its killed service lost comes from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from rnnddp.config import WandbConfig
from rnnddp.metrics import MetricsLogger
from rnnddp.wandb_files import history, offline_runs


def _logger(run: Path, resumed_at: int | None = None) -> MetricsLogger:
    cfg = WandbConfig(mode="offline")
    return MetricsLogger(
        run, enabled=True, wandb_cfg=cfg, run_id=f"r{abs(hash(str(run))) % 10**10}", resumed_at=resumed_at
    )


def _end(logger: MetricsLogger) -> None:
    """Close the session and stop W&B's service, so its file is complete (as after a real exit)."""
    import wandb

    logger.close()
    wandb.teardown()


def test_steps_that_wandb_lost_are_logged_again_from_metrics_jsonl(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _logger(run)
    for step in range(1, 13):
        first.log({"train/loss": 1.0 / step}, step)
    _end(first)
    # The same session went on to step 30 and was killed with its W&B service: metrics.jsonl has
    # steps 13..30, W&B has none of them; the newest checkpoint is step 20.
    with (run / "metrics.jsonl").open("a") as f:
        for step in range(13, 31):
            f.write(json.dumps({"step": step, "time": 0.0, "train/loss": 1.0 / step}) + "\n")
    second = _logger(run, resumed_at=20)
    second.event("resume", 20)
    for step in range(21, 26):
        second.log({"train/loss": 1.0 / step}, step)
    _end(second)

    sessions = [history(f) for f in offline_runs(run)]
    assert len(sessions) == 2
    steps = [int(row["_step"]) for rows in sessions for row in rows]
    assert sorted(steps) == list(range(1, 26)), steps  # 13..20 again from the file; 21..30 of the dead session not
    loss = {int(row["_step"]): json.loads(row["train/loss"]) for rows in sessions for row in rows}
    assert loss[15] == 1.0 / 15


def test_steps_that_wandb_holds_are_not_logged_again_when_redone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _logger(run)
    for step in range(1, 26):  # W&B got up to step 25 before the kill; the checkpoint is step 20
        first.log({"train/loss": 1.0 / step}, step)
    _end(first)
    second = _logger(run, resumed_at=20)
    second.event("resume", 20)
    for step in range(21, 36):  # the resumed job redoes 21..25 (same values), then goes on
        second.log({"train/loss": 1.0 / step}, step)
    _end(second)
    steps = [int(row["_step"]) for f in offline_runs(run) for row in history(f)]
    assert sorted(steps) == list(range(1, 36)), steps  # 21..25 once, from the first session
