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
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rnnddp")
WANDB_MODES = ("auto", "online", "offline", "disabled")  # wandb.mode
START_WAIT_S = 60  # how long the first W&B call that needs the run waits for a background start


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
        background: bool = False,
        resumed_at: int | None = None,
    ) -> None:
        """``background``: start W&B in a thread and go on; what is logged meanwhile goes to metrics.jsonl at
        once and to W&B when it is up. Training does not wait for W&B's start (about a second).
        ``resumed_at``: the step of the checkpoint this session resumed from; W&B gets the steps up to
        it that metrics.jsonl has and W&B lacks (its service may have died with them)."""
        self.enabled = enabled
        self.run_id = run_id or new_run_id()
        self._wandb_run: Any = None
        self._starting: threading.Thread | None = None
        self._pending: list[Callable[[Any], None]] = []  # W&B calls made before it was up, in order
        self._wandb_has = -1  # the last step W&B holds from earlier sessions of this run (see _init_wandb)
        self._jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = run_dir / "metrics.jsonl"
        earlier = jsonl.stat().st_size if jsonl.exists() else 0  # what earlier sessions wrote
        self._jsonl = open(jsonl, "a", buffering=1)  # noqa: SIM115  (lives as long as the run)
        if wandb_cfg is None:
            return
        self._backfill = (jsonl, earlier, resumed_at)
        args = (run_dir, wandb_cfg, run_name, config or {})
        if not background:
            self._wandb_run = self._init_wandb(*args)
            return

        def start() -> None:
            try:
                self._wandb_run = self._init_wandb(*args)
            except Exception as e:  # W&B is a by-product: the run goes on with metrics.jsonl
                log.warning(
                    "wandb could not start (%s); metrics go to metrics.jsonl only", str(e).splitlines()[0][:160]
                )

        self._starting = threading.Thread(target=start, name="wandb-start", daemon=True)
        self._starting.start()

    @property
    def wandb_run(self) -> Any:
        """The W&B run (None when off, failed or not up in time), waiting for its start if need be."""
        if self._starting is not None:
            self._starting.join(timeout=START_WAIT_S)
            if self._starting.is_alive():  # still starting: give up on it (the thread is a daemon)
                log.warning("wandb did not start within %d s; metrics go to metrics.jsonl only", START_WAIT_S)
                self._wandb_run = None
            self._starting = None
        return self._wandb_run

    def _to_wandb(self, call: Callable[[Any], None]) -> None:
        """Make a W&B call now, or queue it while W&B is still starting (calls keep their order)."""
        if self._starting is not None and self._starting.is_alive():
            self._pending.append(call)
            return
        self._drain([call])

    def _drain(self, calls: list[Callable[[Any], None]]) -> None:
        run = self.wandb_run
        pending, self._pending = self._pending, []
        if run is None:
            return
        try:
            for queued in [*pending, *calls]:
                queued(run)
        except Exception as e:  # W&B's service died or refused: warn once, keep metrics.jsonl going
            log.warning("wandb failed (%s); metrics go to metrics.jsonl only from here on", _first_line(e))
            self._wandb_run = None

    def _init_wandb(self, run_dir: Path, cfg: Any, run_name: str, config: dict) -> Any:
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return None
        import wandb

        from rnnddp.wandb_files import last_step

        # After a crash the resumed job redoes the steps since its checkpoint. W&B keeps the rows it
        # already has (equal to the redone ones: the resume is exact) and gets only the steps after them.
        self._wandb_has = last_step(run_dir, self.run_id)
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
            run = wandb.init(
                mode=mode, settings=wandb.Settings(init_timeout=cfg.init_timeout_s, console="off"), **kwargs
            )
        except Exception as e:  # online but no network, or the service refused us
            if mode != "online":
                raise
            log.warning("wandb online init failed (%s); logging offline instead", _first_line(e))
            wandb.teardown()  # W&B's service still holds the run id of the failed attempt ("in use")
            mode = "offline"
            run = wandb.init(mode=mode, settings=wandb.Settings(console="off"), **kwargs)
        self._wandb_has = max(self._wandb_has, run.starting_step - 1)  # online: the server's last step
        log.info("wandb: %s run %s in %s", mode, self.run_id, run.dir)
        jsonl, size, resumed_at = self._backfill
        if resumed_at is not None and resumed_at > self._wandb_has:
            rows = [r for r in kept_records(jsonl, size) if self._wandb_has < r["step"] <= resumed_at]
            for r in rows:
                run.log({k: v for k, v in r.items() if k not in ("step", "time")}, step=r["step"])
            if rows:
                log.info("wandb: logged %d record(s) from metrics.jsonl that W&B had lost", len(rows))
            self._wandb_has = resumed_at
        elif self._wandb_has >= 0:
            log.info("wandb: steps up to %d were logged before; W&B gets the steps after them", self._wandb_has)
        return run

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._to_wandb(lambda run: self._wandb_log(run, metrics, step))

    def _wandb_log(self, run: Any, metrics: dict[str, Any], step: int) -> None:
        if step > self._wandb_has:  # W&B would drop a lower step (online) or hold it twice (offline files)
            run.log(metrics, step=step)

    def images(self, paths: dict[str, Path], step: int) -> None:
        """Log picture files (learning curves, confusion matrix) as W&B images, when a W&B run is active."""
        if not self.enabled or not paths:
            return

        def call(run: Any) -> None:
            import wandb

            self._wandb_log(run, {f"plots/{k}": wandb.Image(str(p)) for k, p in paths.items()}, step)

        self._to_wandb(call)

    def event(self, name: str, step: int, **fields: Any) -> None:
        """A non-metric record in metrics.jsonl (resume, stop), so step counts can be audited."""
        if self._jsonl is not None:
            self._jsonl.write(event_line(name, step, **fields))

    def summary(self, values: dict[str, float]) -> None:
        if not self.enabled:
            return

        def call(run: Any) -> None:
            for k, v in values.items():
                run.summary[k] = v

        self._to_wandb(call)

    def close(self, finished_at: int | None = None) -> None:
        """Finish the W&B run (waiting for a start still under way), then close metrics.jsonl.

        ``finished_at``: the run's ``finished`` event is written between the two, so that it means W&B has
        everything too: a job killed before it tests again when rerun, and that run gives W&B what it lost.
        """
        try:
            self._drain([lambda run: run.finish()])
            self._wandb_run = None
        finally:
            if self._jsonl is not None:
                if finished_at is not None:
                    self._jsonl.write(event_line("finished", finished_at))
                self._jsonl.close()
                self._jsonl = None


# Events after which the records past their step no longer count: a resume at step N (steps N+1.. were
# redone), and a restart of a run directory that holds no intact checkpoint (everything is redone).
VOIDING_EVENTS = ("resume", "restart")


def event_line(name: str, step: int, **fields: Any) -> str:
    """One metrics.jsonl event record, newline included."""
    return json.dumps({"step": step, "time": round(time.time(), 3), "event": name, **fields}) + "\n"


def kept_records(path: Path, size: int | None = None, events: bool = False) -> list[dict[str, Any]]:
    """The metric records among the first ``size`` bytes of a metrics.jsonl that still count: a
    ``resume`` event at step N (or a ``restart``, at 0) voids the records after N before it (steps redone),
    and a final test replaces the one before it (a job killed after its test but before its ``finished``
    event tests the same model again when rerun). ``events``: the other events too (a voided run's
    ``finished`` is no longer its end)."""
    with path.open("rb") as f:
        lines = f.read(-1 if size is None else size).decode(errors="replace").splitlines()
    kept: list[dict[str, Any]] = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if r.get("event") in VOIDING_EVENTS:
            kept = [k for k in kept if k["step"] <= r["step"]]
        elif (events or "event" not in r) and isinstance(r.get("step"), int):
            if is_test_record(r):
                kept = [k for k in kept if not is_test_record(k)]
            kept.append(r)
    return kept


def is_test_record(record: dict[str, Any]) -> bool:
    """A final test's record (its test/* metrics)."""
    return any(k.startswith("test/") for k in record)


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:160]


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
    log_scale: bool = False  # plotted on a log axis (an error that falls by orders of magnitude)

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` (None: no result yet); NaN never does."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best
