"""Wiring only: look the task up, build the parts, train, test the final model, report.

``build_trainer`` is the one construction path: the job, the benchmarks and the tests build
the model, optimiser, schedule, precision, step and trainer through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rnnddp import checkpoint, dist, plots, resume
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import to_dict, to_yaml
from rnnddp.dist import DistInfo
from rnnddp.errors import EXIT_STOPPED, UserError, require_writable
from rnnddp.metrics import MetricsLogger, event_line, kept_records, new_run_id
from rnnddp.models import initial_model, place
from rnnddp.plots import write_plots
from rnnddp.preemption import StopRequest
from rnnddp.tasks import TASKS, Splits, Task
from rnnddp.train import cuda_graph, faults
from rnnddp.train.averaging import WeightAverage
from rnnddp.train.optim import build_optimizer, build_scheduler, total_steps
from rnnddp.train.precision import Precision, resolve_precision
from rnnddp.train.step import TrainStep
from rnnddp.train.trainer import Batches, Trainer

log = logging.getLogger("rnnddp")
CHECKPOINT_FORMAT = checkpoint.FORMAT


def find_resume_point(cfg: Any, manager: CheckpointManager) -> Path | None:
    """The checkpoint to continue from, per ``cfg.resume`` (auto | none | PATH)."""
    if cfg.resume == "none":
        if manager.step_files():
            raise UserError(
                f"{manager.dir} already holds checkpoints and resume=none would overwrite them; "
                "use resume=auto to continue, or a new name=/run_dir="
            )
        return None
    if cfg.resume == "auto":
        return manager.find_latest()
    path = Path(cfg.resume)
    if not path.is_file():
        raise UserError(f"resume={cfg.resume}: no such checkpoint file; pass an existing .pt, or resume=auto")
    reason = checkpoint.verify(path, require_marker=False)
    if reason is not None:
        raise UserError(f"resume={cfg.resume}: {reason}; pick another checkpoint")
    return path


def check_resumable(state: dict[str, Any], cfg: Any, task: Task, args: dict, path: Path) -> None:
    """Refuse a checkpoint of another format, task, model or data before anything is written."""
    if state.get("format", 1) < CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} was written before the validation split existed (its training set held the "
            "validation images), so it cannot be resumed; evaluate it with rnnddp-evaluate, or start a new run "
            "with another name="
        )
    saved_task = (state.get("config") or {}).get("task")
    if saved_task != cfg.task:
        raise UserError(
            f"checkpoint {path} was trained for task={saved_task}, the config says {cfg.task}; "
            "start a new run with another name="
        )
    saved = state.get("model_args")
    if saved != args:
        diff = {k: (saved.get(k) if saved else None, v) for k, v in args.items() if not saved or saved.get(k) != v}
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise UserError(
            f"checkpoint {path} is for a different model ({detail}); match the config to it, "
            "or start a new run with another name= (or resume=none in an empty run_dir)"
        )
    task.check_resume(state, path)


def check_averaging(cfg: Any, splits: Splits) -> None:
    """average.mode=asgd needs validation results to decide when to start."""
    if cfg.average.mode == "asgd" and splits.val is None:
        raise UserError(
            "average.mode=asgd starts averaging when validation stalls, and this run has no validation split; "
            "give it one, or use average.mode=ema"
        )


@dataclass
class Built:
    trainer: Trainer
    task: Task
    splits: Splits
    precision: Precision


def build_trainer(
    cfg: Any,
    info: DistInfo,
    manager: CheckpointManager,
    task: Task | None = None,
    splits: Splits | None = None,
    batches: Batches | None = None,
    stop: StopRequest | None = None,
) -> Built:
    """The task's data and batches, the model, optimiser, schedule, precision, step and Trainer, as the job runs them."""
    if info.device.type == "cuda":
        dist.configure_cuda(cfg.train.tf32)
    task = task or TASKS[cfg.task](cfg, info)
    splits = splits or task.load()
    batches = batches or task.train_batches(splits.train)
    train = cfg.train
    graph_why = None
    if train.cuda_graph:
        graph_why = cuda_graph.unsupported_reason(
            info.device, info.distributed, task.cuda_graph_unsupported, cfg.optim, cfg.model,
            cfg.debug.nonfinite_from_step,
        )  # fmt: skip
        if graph_why:
            log.warning("train.cuda_graph=true ignored: %s; training without CUDA graphs", graph_why)
    graphed = train.cuda_graph and graph_why is None

    module = initial_model(task.model_args(), cfg.seed, cfg.model.chrono_init)
    task.init_weights(module)
    module = place(module, info.device)
    check_averaging(cfg, splits)
    averaging = WeightAverage.from_config(cfg.average, module, task.metric)  # of the unwrapped module
    torch.manual_seed(cfg.seed + info.rank)  # per-rank streams from here on (dropout)
    model = dist.wrap_ddp(module, info, cfg.dist.grad_sync)
    precision = resolve_precision(train.precision, info.device)
    optimizer = build_optimizer(module, cfg.optim, capturable=graphed)
    steps = total_steps(train.epochs, train.max_steps, batches.steps_per_epoch)
    scheduler = build_scheduler(optimizer, steps, cfg.sched)
    scaler = precision.grad_scaler()
    autocast = precision.autocast(cache=not graphed)

    trainer: Trainer | None = None

    def loss_fn(batch: Any) -> torch.Tensor:
        return task.loss(model, batch, autocast)

    loss = faults.nan_from_step(loss_fn, cfg.debug.nonfinite_from_step, lambda: trainer.global_step)
    step = TrainStep(loss, module, optimizer, scaler, train.grad_clip)
    eval_autocast = precision.autocast()
    validate = None
    if splits.val is not None:
        val = splits.val.to(info.device) if info.device.type == "cuda" else splits.val

        def validate(m: torch.nn.Module) -> dict[str, Any]:
            return task.evaluate(m, val, eval_autocast)

    debug = cfg.debug
    hooks = [
        faults.kill_after_step(debug.fail_at_step, debug.fail_rank, info.rank),
        faults.stop_after_step(debug.stop_at_step, debug.fail_rank, info.rank, list(train.stop_signals)),
        faults.pace(debug.step_delay_s),
    ]
    trainer = Trainer(
        train,
        info,
        module=module,
        step=cuda_graph.GraphedStep(step) if graphed else step,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        batches=batches,
        checkpoints=manager,
        metric=task.metric,
        validate=validate,
        eval_every=cfg.eval.every_steps,
        save_every=cfg.checkpoint.every_steps,
        seed=cfg.seed,
        stateful=[task],
        hooks=[h for h in hooks if h is not None],
        stop=stop,
        description=f"precision {precision.name}, device {info.device}, {torch.get_num_threads()} CPU thread(s)"
        + f", backend {info.backend or 'none'}"
        + (f", gradients by {dist.grad_sync_mode(cfg.dist.grad_sync, info)}" if info.distributed else "")
        + (", CUDA graph" if graphed else "")
        + (f", weights averaged ({cfg.average.mode})" if averaging else ""),
        averaging=averaging,
    )
    return Built(trainer, task, splits, precision)


def evaluate_on_test(built: Built, cfg: Any, info: DistInfo, run_dir: Path) -> dict[str, Any] | None:
    """Rank 0 evaluates the final model (its averaged weights, when averaging has started) on the test split
    once, logs ``test/*`` and draws the pictures."""
    trainer, task = built.trainer, built.task
    if not info.is_main:
        return None
    test = built.splits.test
    result = task.evaluate(trainer.eval_module, test.to(info.device), built.precision.autocast(), detail=True)
    name = task.metric.name
    trainer.logger.log({"test/loss": result["loss"], f"test/{name}": result[name]}, trainer.global_step)
    trainer.logger.summary({f"test/{name}": result[name], "test/loss": result["loss"]})
    if not cfg.eval.plots:
        return result
    pictures = task.pictures(result, test)
    metrics = run_dir / "metrics.jsonl"
    written = write_plots(run_dir / "plots", pictures, metrics_path=metrics, metric=task.metric)
    if written:
        log.info("plots: %s", ", ".join(str(p) for p in written.values()))
    trainer.logger.images(written, trainer.global_step)
    return result


def run(cfg: Any, info: DistInfo) -> int:
    run_dir = Path(cfg.run_dir)
    manager = CheckpointManager(run_dir, keep=cfg.checkpoint.keep, writer=info.is_main)
    task = TASKS[cfg.task](cfg, info)
    args = task.model_args()

    error: UserError | None = None
    if info.is_main:  # the places rank 0 writes, checked before any work (every rank hears of a failure)
        try:
            for folder in (run_dir, manager.dir, *([run_dir / "plots"] if cfg.eval.plots else [])):
                require_writable(folder, "set run_dir= to a writable folder (or make this one writable)")
        except UserError as e:
            error = e
    if not dist.all_ok(error is None, info):
        raise error or UserError("rank 0 cannot write its run directory; see its message")
    manager.clean_leftovers()  # rank 0, before any save: what a killed save left behind
    chosen, pick_error = None, None
    if info.is_main:  # rank 0 picks; the others load the same bytes or stop the job
        try:
            chosen = find_resume_point(cfg, manager)
        except UserError as e:
            pick_error = str(e)
    resume_path = resume.agree_on_checkpoint(chosen, pick_error, manager, info)
    state = checkpoint.load(resume_path) if resume_path else None
    if state is not None:
        check_resumable(state, cfg, task, args, resume_path)

    splits = task.load()
    check_averaging(cfg, splits)
    batches = task.train_batches(splits.train)  # bad input (data, batch size) stops the job before W&B starts
    changes = None
    if state is not None:  # every other difference is refused here, before anything is written
        changes = resume.compare(state["config"], cfg, resume_path, task.RESUME_SAFE, batches.steps_per_epoch)
    trained = state is not None and state["global_step"] >= total_steps(
        cfg.train.epochs, cfg.train.max_steps, batches.steps_per_epoch
    )
    # Every rank takes the same branch: any rank that sees no final test makes all of them test.
    if trained and dist.all_ok(_tested(run_dir, state["global_step"]), info):
        log.info(
            "run %s already finished at step %d (%s); nothing to do (lengthen it with train.epochs= or "
            "train.max_steps=, or start another run with name=NEW)",
            cfg.name,
            state["global_step"],
            resume_path,
        )
        return 0
    step = state["global_step"] if state else 0
    resume.check_progress(run_dir, step, cfg.dist.max_stalled_restarts, info, resume_path)
    manager.point_latest(resume_path)
    stop = StopRequest(list(cfg.train.stop_signals))  # held through the final test, not only fit
    try:
        return _train_and_test(cfg, info, manager, task, splits, batches, state, resume_path, trained, stop, changes)
    finally:
        stop.close()


def _note_lost_peer(run_dir: Path, step: int, rank: int) -> None:
    """Append a ``lost_peer`` event to metrics.jsonl (one short write in append mode: whole lines
    from several ranks at once)."""
    with contextlib.suppress(OSError), (run_dir / "metrics.jsonl").open("a") as f:
        f.write(event_line("lost_peer", step, rank=rank))


def _tested(run_dir: Path, step: int) -> bool:
    """Whether the run directory records the final test of step ``step`` (its ``finished`` event), one that
    still counts: a finished run whose end a user destroyed resumed earlier, which voided that test."""
    try:
        history = kept_records(run_dir / "metrics.jsonl", events=True)
    except OSError:
        return False
    return any(r.get("event") == "finished" and r["step"] == step for r in history)


def _train_and_test(
    cfg: Any,
    info: DistInfo,
    manager: CheckpointManager,
    task: Task,
    splits: Splits,
    batches: Batches,
    state: dict[str, Any] | None,
    resume_path: Path | None,
    trained: bool,
    stop: StopRequest,
    changes: resume.Changes | None = None,
) -> int:
    run_dir = Path(cfg.run_dir)
    previous = run_dir / "metrics.jsonl"
    # Records of an earlier attempt without an intact checkpoint (killed before its first save, or every
    # checkpoint damaged): this run starts over, and says so, so that those records stop counting.
    restarting = state is None and previous.is_file() and bool(kept_records(previous))
    built = build_trainer(cfg, info, manager, task=task, splits=splits, batches=batches, stop=stop)
    trainer = built.trainer
    if state is not None:
        trainer.load_state_dict(state)  # before anything is written: a refusal here leaves the run as it was
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(run_dir / "config.yaml", to_yaml(cfg).encode())  # a kill never leaves half of it
        log.info("config:\n%s", to_yaml(cfg))
    run_id = state.get("wandb_run_id") if state else new_run_id()
    # W&B starts in a thread and training does not wait for it: its start is Python work that
    # overlaps with the training steps' kernels (which release the GIL), not with building the model.
    trainer.logger = MetricsLogger(
        run_dir,
        enabled=info.is_main,
        wandb_cfg=cfg.wandb,
        run_name=cfg.name,
        config=to_dict(cfg),
        run_id=run_id,
        background=True,
        resumed_at=trainer.global_step if state is not None else None,
    )
    trainer.extra_state = {
        "format": CHECKPOINT_FORMAT,
        "model_args": task.model_args(),
        "config": to_dict(cfg),
        "wandb_run_id": run_id,
    }
    test, finished_at = None, None
    try:
        if state is not None:
            log.info(
                "resuming from %s at step %d (epoch %d, batch %d)",
                resume_path,
                trainer.global_step,
                trainer.epoch,
                trainer.step_in_epoch,
            )
            slurm = {k.lower(): os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT") if k in os.environ}
            changed = {k: list(v) for k, v in changes.applied.items()} if changes and changes.applied else {}
            if changed:
                log.info("resuming with changed settings: %s", changes.describe())
            if changes and changes.extends:
                log.warning(
                    "lengthening the run from %d to %d steps: the LR schedule is re-planned over %d steps "
                    "(the steps taken keep their LRs; the next one's is %.3g)",
                    changes.old_total,
                    changes.new_total,
                    changes.new_total,
                    trainer.scheduler.get_last_lr()[0],
                )
            extra = {"changed": changed} if changed else {}
            trainer.logger.event(
                "resume",
                trainer.global_step,
                checkpoint=str(resume_path),
                world_size=info.world_size,
                **slurm,
                **extra,
            )
        elif restarting:
            log.warning("%s holds an earlier attempt's records but no intact checkpoint: starting over", run_dir)
            trainer.logger.event("restart", 0, reason="no intact checkpoint")
        if info.is_main and cfg.eval.plots:
            plots.preload()  # only rank 0 draws
        if trained:  # trained to the end before, but stopped before its final test
            log.info("run %s was trained to step %d; testing its final model", cfg.name, trainer.global_step)
            status = "finished"
        else:
            status = trainer.fit()
        if status == "finished":
            test = evaluate_on_test(built, cfg, info, run_dir)
            finished_at = trainer.global_step  # the event goes in once W&B has finished (close)
    except Exception as e:
        if info.distributed and dist.lost_peer(e):
            # Every surviving rank notes it (rank 0 may be the one lost): a scheduler's script reads it.
            _note_lost_peer(run_dir, trainer.global_step, info.rank)
        raise
    finally:
        trainer.logger.close(finished_at)
    # Leave together: a rank that tears its process group down while rank 0 still tests, draws
    # or flushes W&B has been seen to abort in gloo at exit.
    dist.barrier(info)
    if status == "stopped":
        took = time.monotonic() - trainer.stop.time if trainer.stop.time is not None else 0.0
        log.warning(
            "exiting %d (resumable) %.2fs after the stop request; rerun the same command to resume", EXIT_STOPPED, took
        )
        return EXIT_STOPPED
    if test is not None:
        name = built.task.metric.name
        log.info(
            "done: best val %s %.4f; final model: test %s %.4f, loss %.4f",
            name,
            trainer.best_for_log,
            name,
            test[name],
            test["loss"],
        )
    return 0
