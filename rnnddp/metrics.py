"""Where numbers go: stdout (Python logging), ``metrics.jsonl``, and Weights & Biases.

Only rank 0 writes; on other ranks every method is a no-op, so callers never check ranks.
wandb is imported only when a run uses it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rnnddp")
WANDB_MODES = ("auto", "online", "offline", "disabled")  # wandb.mode


def setup_logging(is_main: bool, rank: int = 0) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, tagged with their rank."""
    level = logging.INFO if is_main else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(message)s" if is_main else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(mode: str) -> str:
    """auto -> online when an API key is configured, else offline (sync later with `wandb sync`)."""
    if mode == "auto":
        return "online" if _has_wandb_key() else "offline"
    return mode


class MetricsLogger:
    """One ``log(metrics, step)`` for stdout, metrics.jsonl and W&B (rank 0 only)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        wandb_cfg: Any = None,
        run_name: str = "",
        config: dict | None = None,
        run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_id = run_id or new_run_id()
        self.wandb_run = None
        self._jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115  (lives as long as the run)
        if wandb_cfg is not None:
            self.wandb_run = self._init_wandb(run_dir, wandb_cfg, run_name, config or {})

    def _init_wandb(self, run_dir: Path, cfg: Any, run_name: str, config: dict) -> Any:
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return None
        import wandb

        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            tags=list(cfg.tags),
            config=config,
            id=self.run_id,
            resume="allow",  # a resumed job continues the same W&B run
            dir=str(run_dir),
        )
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, console="off"), **kwargs)
        except Exception as e:  # online but no network, or the service refused us
            if mode != "online":
                raise
            log.warning("wandb online init failed (%s); logging offline instead", str(e).splitlines()[0][:120])
            run = wandb.init(mode="offline", settings=wandb.Settings(console="off"), **kwargs)
        log.info("wandb: %s run %s in %s", mode, self.run_id, run.dir)
        return run

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def images(self, paths: dict[str, Path], step: int) -> None:
        """Log picture files (learning curves, confusion matrix) as W&B images, when a W&B run is active."""
        if self.wandb_run is None or not paths:
            return
        import wandb

        self.wandb_run.log({f"plots/{k}": wandb.Image(str(p)) for k, p in paths.items()}, step=step)

    def event(self, name: str, step: int, **fields: Any) -> None:
        """A non-metric record in metrics.jsonl (resume, stop), so step counts can be audited."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), "event": name, **fields}) + "\n")

    def summary(self, values: dict[str, float]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def fmt(metrics: dict[str, float]) -> str:
    """Compact one-line rendering for stdout."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float) and math.isfinite(v):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


@dataclass(frozen=True)
class Metric:
    """The number that picks the best checkpoint: its name and which way is better."""

    name: str  # accuracy | mse | ...
    higher_is_better: bool

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` (None: no result yet); NaN never does."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best
