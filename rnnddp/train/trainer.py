"""The training loop, whatever the task: the cadence (log, validate, save), the log window, the stop vote.

It receives built objects (the step, optimiser, schedule, scaler, batches, validation, checkpoint
manager, logger) and reads no task name. Everything that must survive a restart is in
``state_dict()``; the checkpoint manager writes it and the metrics logger records numbers, so this
file neither writes files nor calls wandb.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from rnnddp import dist
from rnnddp.checkpoint import CheckpointManager
from rnnddp.dist import DistInfo
from rnnddp.errors import NonFiniteLossError
from rnnddp.metrics import Metric, MetricsLogger, fmt
from rnnddp.preemption import StopRequest
from rnnddp.train.averaging import WeightAverage
from rnnddp.train.optim import total_steps

log = logging.getLogger("rnnddp")


class Batches(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Any]: ...


class Stateful(Protocol):
    """A part whose state goes into the checkpoint (its entries merged at the top level)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Window:
    """Device-side running sums between log steps: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.bad_run = torch.zeros((), device=device, dtype=torch.long)  # consecutive non-finite losses now
        self.bad_max = torch.zeros((), device=device, dtype=torch.long)  # longest such run in the window
        self.reset()

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += loss  # a NaN shows in the logged loss
        self.bad_run = torch.where(finite, 0, self.bad_run + 1)
        self.bad_max = torch.maximum(self.bad_max, self.bad_run)
        self.steps += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.bad_max.copy_(self.bad_run)
        self.steps, self.start = 0, time.perf_counter()


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Fit ``step`` over ``batches``; validate, log and save on the configured cadence.

    ``train`` is the config's train section (epochs, max_steps, global_batch_size,
    log_every_steps, max_nonfinite, stop_signals). ``validate(module)`` runs on rank 0 alone and
    returns a dict with ``loss`` and ``metric.name``; None means no validation split (no best.pt).
    ``averaging`` (optional) averages the weights after every step; validation (hence best.pt) and
    ``eval_module`` use the average once it has started.
    """

    def __init__(
        self,
        train: Any,
        info: DistInfo,
        *,
        module: nn.Module,
        step: Callable[[Any], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        batches: Batches,
        checkpoints: CheckpointManager,
        metric: Metric,
        validate: Callable[[nn.Module], dict[str, Any]] | None = None,
        eval_every: int = 0,
        save_every: int = 0,
        seed: int = 0,
        stateful: list[Stateful] | None = None,
        hooks: list[Callable[[int], None]] | None = None,
        logger: MetricsLogger | None = None,
        stop: StopRequest | None = None,
        description: str = "",
        averaging: WeightAverage | None = None,
    ) -> None:
        self.cfg, self.info = train, info
        self.module = module  # unwrapped: validated and checkpointed
        self.step = step
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.batches = batches
        self.checkpoints = checkpoints
        self.metric = metric
        self.validate = validate
        self.eval_every, self.save_every, self.seed = eval_every, save_every, seed
        self.stateful = stateful or []
        self.hooks = hooks or []
        self.logger = logger or MetricsLogger("", enabled=False)
        self.description = description  # what is trained, for the first log line
        self.averaging = averaging
        # The caller may own the stop handlers (to keep them through what follows fit); else fit does.
        self.stop = stop
        self._owns_stop = stop is None
        self.extra_state: dict[str, Any] = {}  # model args, config, run id: stored, not used here
        self.total_steps = total_steps(train.epochs, train.max_steps, batches.steps_per_epoch)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.last_eval: dict[str, float] = {}
        self._window = _Window(info.device)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best,
            "world_size": self.info.world_size,
            "rng": dist.gather_objects(rng_state(), self.info),  # every rank's, indexed by rank
        }
        for part in self.stateful:  # every rank joins: parts may gather across ranks
            state.update(part.state_dict())
        if self.averaging is not None:  # the averaged weights beside the training ones ("model"), which resume
            state.update(self.averaging.state_dict())
        return {**state, **self.extra_state}

    @property
    def best_for_log(self) -> float:
        """The best validation result so far, NaN while there is none."""
        return float("nan") if self.best is None else self.best

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        # The implementation (fused or not) is this run's choice, not the checkpoint's: a file
        # written before fused Adam on the CPU would otherwise keep the slower loop.
        for saved, now in zip(state["optimizer"]["param_groups"], self.optimizer.param_groups, strict=True):
            for key in ("fused", "capturable"):  # likewise whether it runs in a CUDA graph
                if key in now:
                    saved[key] = now[key]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of the step and the run's length: the next step's LR from it. The
        # same value when the length is unchanged; a lengthened run's longer schedule otherwise.
        s = self.scheduler
        lrs = [base * factor(s.last_epoch) for factor, base in zip(s.lr_lambdas, s.base_lrs, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        s._last_lr = lrs
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # else: the checkpoint ran without loss scaling (fp32/CPU); start the scaler fresh.
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        if self.step_in_epoch >= self.batches.steps_per_epoch:
            # Written by a stop on an epoch's last step before that was fixed: the next epoch's start.
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.global_step = state["global_step"]
        best = state.get("best_metric")
        self.best = None if best is None or best != best else best
        for part in self.stateful:
            part.load_state_dict(state)
        if self.averaging is not None:
            self.averaging.load_state_dict(state)
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            # The data order does not depend on the world size (see data/batches.py), so the
            # position is exact; only per-rank random streams (dropout) cannot be carried over.
            log.warning(
                "checkpoint was written by %d ranks, resuming on %d: data position is exact, "
                "per-rank random streams are re-seeded",
                len(rngs),
                self.info.world_size,
            )
            torch.manual_seed(self.seed + 1000 * self.global_step + self.info.rank)

    @property
    def eval_module(self) -> nn.Module:
        """What validation and the final test evaluate: the averaged weights once averaging has started."""
        return self.module if self.averaging is None else self.averaging.module_for_eval()

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    # -- loop -------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> torch.Tensor:
        """One optimiser step and the schedule's step after it."""
        loss = self.step(batch)
        self.scheduler.step()
        return loss

    def fit(self) -> str:
        """Train to the end ("finished") or to an agreed stop request ("stopped", checkpoint saved)."""
        cfg, info = self.cfg, self.info
        log.info(
            "training %d steps (%d epochs x %d steps, global batch %d over %d rank(s))%s",
            self.total_steps,
            cfg.epochs,
            self.batches.steps_per_epoch,
            cfg.global_batch_size,
            info.world_size,
            f", {self.description}" if self.description else "",
        )
        if self._owns_stop:
            self.stop = StopRequest(list(cfg.stop_signals))
        vote = dist.FlagVote(info)
        bar = self._progress_bar()
        self._window.reset()
        self.module.train()
        self.logger.event("train_begin", self.global_step)
        try:
            while not self.finished:
                before = self.global_step
                for batch in self.batches.epoch(self.epoch, self.step_in_epoch):
                    self._window.add(self.train_step(batch))
                    self.step_in_epoch += 1
                    self.global_step += 1
                    if self.averaging is not None:  # before the hooks: a stop checkpoint holds this step's average
                        self.averaging.update(self.global_step)
                    if bar is not None:
                        bar.update(1)
                    for hook in self.hooks:
                        hook(self.global_step)
                    # This step's own work first (an epoch's end: validation, save, the next epoch's
                    # position), so a stop checkpoint never points past an epoch's last batch.
                    saved = self._after_step(bar)
                    if self.finished:  # the last step finishes the run instead: test (seconds), exit 0
                        break
                    if vote(self.stop.requested):
                        vote.close()
                        self._log_window(bar)
                        if not saved:
                            self._save()
                        dist.barrier(info)  # nobody exits while rank 0 still writes (other nodes' torchrun)
                        log.warning(
                            "stopped on %s at step %d: checkpoint saved",
                            self.stop.name or "a peer's signal",
                            self.global_step,
                        )
                        self.logger.event("stopped", self.global_step, signal=self.stop.name)
                        return "stopped"
                if self.global_step == before:  # a position past the epoch's end would loop forever
                    raise RuntimeError(
                        f"epoch {self.epoch} has no batch at or after {self.step_in_epoch} of "
                        f"{self.batches.steps_per_epoch}; the checkpoint does not fit this data"
                    )
        except BaseException:
            vote.abandon()  # a lost peer would never answer it
            raise
        finally:
            vote.close()
            if self._owns_stop:
                self.stop.close()
            if bar is not None:
                bar.close()
        self.logger.event("train_end", self.global_step)
        self.logger.summary({f"best_val_{self.metric.name}": self.best})
        return "finished"

    def _after_step(self, bar: Any) -> bool:
        """Log, validate and save when this step calls for it; returns whether it saved."""
        last_of_epoch = self.step_in_epoch == self.batches.steps_per_epoch
        if _every(self.global_step, self.cfg.log_every_steps) or last_of_epoch or self.finished:
            self._log_window(bar)
        if last_of_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        boundary = last_of_epoch or self.finished
        do_eval = self.validate is not None and (boundary or _every(self.global_step, self.eval_every))
        do_save = boundary or _every(self.global_step, self.save_every)
        new_best = self._validate() if do_eval else False
        if do_save or new_best:
            self._save(best=new_best)
        if do_eval or do_save:
            self._window.start = time.perf_counter()  # samples/s counts training time only
        return do_save or new_best

    def _log_window(self, bar: Any) -> None:
        """Average the loss since the last log over ranks, record it, and check for divergence."""
        w = self._window
        if w.steps == 0:
            return
        elapsed = time.perf_counter() - w.start
        loss = dist.mean(w.loss_sum / w.steps).item()
        worst_run = dist.max_value(w.bad_max.float()).item()
        samples_s = w.steps * self.cfg.global_batch_size / max(elapsed, 1e-9)
        metrics = {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_s": samples_s,
            "epoch": self.epoch + self.step_in_epoch / self.batches.steps_per_epoch,
        }
        # Batches may report on themselves (padding, tokens/s), given the window's training time: averaged over
        # ranks like the loss.
        extra = getattr(self.batches, "window_metrics", None)
        for key, value in (extra(elapsed) if extra else {}).items():
            metrics[key] = dist.mean(torch.tensor(float(value), device=self.info.device)).item()
        self.logger.log(metrics, self.global_step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_s:.0f}")
        else:
            log.info("step %d %s", self.global_step, fmt(metrics))
        self._check_finite(worst_run)
        w.reset()

    def _check_finite(self, worst_run: float) -> None:
        """Stop after train.max_nonfinite consecutive non-finite losses. Under a GradScaler too: it skips
        those steps, and a run of them is divergence, not a run that "finishes" on an untrained model."""
        limit = self.cfg.max_nonfinite
        if limit and worst_run >= limit:
            latest = self.checkpoints.find_latest() if self.info.is_main else None
            raise NonFiniteLossError(
                f"loss was not finite for {int(worst_run)} consecutive steps (by step {self.global_step}); "
                f"lower optim.lr or set train.grad_clip; the last good checkpoint is {latest or 'none'}"
            )

    def _validate(self) -> bool:
        """Rank 0 validates the unwrapped module (or its average); the others wait in the broadcast of its result.

        Returns whether this is the best result so far (the same answer on every rank).
        """
        name = self.metric.name
        result = [0.0, 0.0]
        module = self.eval_module
        if self.info.is_main:
            m = self.validate(module)
            result = [float(m["loss"]), float(m[name])]
        loss, value = dist.broadcast_from_main(result, self.info)
        new_best = self.metric.better(value, self.best)
        if new_best:
            self.best = value
        self.last_eval = {"loss": loss, name: value}
        best = self.best_for_log
        metrics = {"val/loss": loss, f"val/{name}": value, f"val/best_{name}": best, "epoch": self.epoch}
        self.logger.log(metrics, self.global_step)
        on = ", averaged weights" if module is not self.module else ""
        log.info("val step %d: loss %.4f %s %.4f (best %.4f%s)", self.global_step, loss, name, value, best, on)
        if self.averaging is not None:  # every rank decides on the same broadcast value
            self.averaging.on_validation(value, self.global_step)
        return new_best

    def _save(self, best: bool = False) -> None:
        # A model that just produced a non-finite loss is never written: latest stays good.
        if dist.max_value(self._window.bad_run.float()).item() > 0:
            log.warning("not saving step %d: the last loss was not finite", self.global_step)
            return
        state = self.state_dict()  # every rank joins: RNG states are gathered
        # The others go on to the next step's gradient exchange meanwhile: a write longer than
        # dist.peer_timeout_s would count as a lost rank 0, but a link cut during the save is noticed.
        path = self.checkpoints.save(state, self.global_step, best=best)
        if path is not None:
            log.info("saved %s%s", path, " (best)" if best else "")

    def _progress_bar(self) -> Any:
        if not (self.info.is_main and sys.stdout.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True)
