"""Wiring: config -> run directory and resume point -> data -> model -> trainer -> logs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from rnnddp import checkpoint, dist
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import Config, to_dict, to_yaml
from rnnddp.data import Split, TrainBatches, load_dataset, locate_dataset, make_permutation
from rnnddp.data import input_size as view_input_size
from rnnddp.dist import DistInfo
from rnnddp.errors import EXIT_STOPPED, UserError
from rnnddp.metrics import MetricsLogger, new_run_id
from rnnddp.models import build_model, chrono_init_, model_args
from rnnddp.plots import write_plots
from rnnddp.sine import ChunkBatches, make_splits
from rnnddp.trainer import Trainer

log = logging.getLogger("rnnddp")


def find_resume_point(cfg: Config, manager: CheckpointManager) -> Path | None:
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


def check_compatible(state: dict[str, Any], args: dict, path: Path) -> None:
    saved = state.get("model_args")
    if saved != args:
        diff = {k: (saved.get(k) if saved else None, v) for k, v in args.items() if not saved or saved.get(k) != v}
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise UserError(
            f"checkpoint {path} is for a different model ({detail}); match the config to it, "
            "or start a new run with another name= (or resume=none in an empty run_dir)"
        )


def check_same_data(state: dict[str, Any], cfg: Config, permutation: torch.Tensor | None, path: Path) -> None:
    """Refuse to resume a checkpoint under another data set, view or pixel order (same shapes, other task)."""
    saved_cfg = state.get("config") or {}
    if saved_cfg.get("task", "classify") != cfg.task:
        raise UserError(
            f"checkpoint {path} was trained for task={saved_cfg.get('task', 'classify')}, the config says "
            f"{cfg.task}; start a new run with another name="
        )
    saved = saved_cfg.get("data", {})
    if cfg.task == "sine_regression":
        # The sequences are generated from these settings and the seed, and a checkpoint taken
        # mid-sequence carries a state for exactly that global batch and chunk position.
        saved_tree = OmegaConf.create(saved_cfg)
        for key in ("data.sine_sequences", "data.sine_length", "data.chunk_len", "seed", "train.global_batch_size"):
            before, now = OmegaConf.select(saved_tree, key), OmegaConf.select(cfg, key)
            if before != now:
                raise UserError(
                    f"checkpoint {path} was trained with {key}={before}, the config says {now}; "
                    f"set {key}={before} or start a new run with another name="
                )
        return
    for key in ("dataset", "view"):
        # Checkpoints from before these keys existed were MNIST rows.
        before = saved.get(key, {"dataset": "mnist", "view": "rows"}[key])
        if before != cfg.data[key]:
            raise UserError(
                f"checkpoint {path} was trained with data.{key}={before}, the config says {cfg.data[key]}; "
                f"set data.{key}={before} or start a new run with another name="
            )
    saved_perm = state.get("permutation")
    if permutation is not None and (saved_perm is None or not torch.equal(saved_perm, permutation)):
        raise UserError(
            f"checkpoint {path} used another pixel permutation; set data.permutation_seed="
            f"{saved.get('permutation_seed')} or start a new run with another name="
        )


def view_permutation(cfg: Config) -> torch.Tensor | None:
    """The fixed pixel order for data.view=permuted_pixels (None for the other views)."""
    return make_permutation(cfg.data.permutation_seed) if cfg.data.view == "permuted_pixels" else None


def initial_model(cfg: Config, args: dict, device: torch.device) -> nn.Module:
    """The network with its initial weights, identical on every rank (DDP also broadcasts them)."""
    torch.manual_seed(cfg.seed)
    model = build_model(args)
    if cfg.model.chrono_init:  # initial weights only: a resume loads the checkpoint's over them
        chrono_init_(model.rnn, cfg.model.chrono_init)
    return model.to(device)


def build_trainer(
    cfg: Config,
    info: DistInfo,
    train_split: Split,
    test_split: Split,
    manager: CheckpointManager,
    input_size: int | None = None,
    permutation: torch.Tensor | None = None,
) -> Trainer:
    """Data placement, batches, the model and the Trainer, as the job sets them up (benchmarks reuse it)."""
    if info.device.type == "cuda":
        dist.configure_cuda(cfg.train.tf32)
    if cfg.task == "sine_regression":
        return _build_sine_trainer(cfg, info, train_split, test_split, manager)
    device_resident = cfg.data.device_resident == "true" or (
        cfg.data.device_resident == "auto" and info.device.type == "cuda"
    )
    if device_resident:
        train_split = train_split.to(info.device)
    if info.device.type == "cuda":
        test_split = test_split.to(info.device)
    batches = TrainBatches(
        train_split,
        global_batch_size=cfg.train.global_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        device=info.device,
        normalize=cfg.data.normalize,
        view=cfg.data.view,
        permutation=permutation if permutation is not None else view_permutation(cfg),
        dataset=cfg.data.dataset,
    )
    if input_size is None:
        input_size = view_input_size(cfg.data.view)
    model = initial_model(cfg, model_args(cfg.model, input_size=input_size), info.device)
    if info.device.type == "cuda" and hasattr(model, "rnn"):
        torch.backends.cudnn.enabled = True
        model.rnn.flatten_parameters()  # contiguous weights: the fused cuDNN kernel, no per-call copy
    torch.manual_seed(cfg.seed + info.rank)  # per-rank streams from here on (dropout)
    return Trainer(cfg, info, model, batches, test_split, checkpoints=manager)


def _build_sine_trainer(
    cfg: Config, info: DistInfo, train_split: Split, test_split: Split, manager: CheckpointManager
) -> Trainer:
    batches = ChunkBatches(
        train_split,
        global_batch_size=cfg.train.global_batch_size,
        chunk_len=cfg.data.chunk_len,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        device=info.device,
    )
    model = initial_model(cfg, model_args(cfg.model, task=cfg.task), info.device)
    torch.manual_seed(cfg.seed + info.rank)
    return Trainer(cfg, info, model, batches, test_split.to(info.device), checkpoints=manager)


def prepare_data(cfg: Config, info: DistInfo) -> tuple[Split, Split]:
    """The task's train and test splits; for a data set, local rank 0 extracts or downloads first."""
    if cfg.task == "sine_regression":
        return make_splits(cfg.data, cfg.seed)  # generated: every rank makes the same sequences
    error: UserError | None = None
    root = None
    if info.local_rank == 0:
        try:
            root = locate_dataset(cfg.data.dataset, cfg.data.root, cfg.data.cache_dir, cfg.data.download)
        except UserError as e:
            error = e
    if not dist.all_ok(error is None, info):
        raise error or UserError("data preparation failed on another rank; see its message")
    if root is None:
        root = locate_dataset(cfg.data.dataset, cfg.data.root, cfg.data.cache_dir, download=False)
    return load_dataset(cfg.data.dataset, root)


def run(cfg: Config, info: DistInfo) -> int:
    run_dir = Path(cfg.run_dir)
    manager = CheckpointManager(run_dir, keep=cfg.checkpoint.keep, writer=info.is_main)
    args = model_args(cfg.model, input_size=view_input_size(cfg.data.view), task=cfg.task)
    permutation = view_permutation(cfg) if cfg.task == "classify" else None

    resume_path = find_resume_point(cfg, manager)
    state = checkpoint.load(resume_path) if resume_path else None
    if state is not None:
        check_compatible(state, args, resume_path)
        check_same_data(state, cfg, permutation, resume_path)

    train_split, test_split = prepare_data(cfg, info)
    trainer = build_trainer(cfg, info, train_split, test_split, manager, permutation=permutation)
    if state is not None:
        trainer.load_state_dict(state)
        if trainer.finished:
            log.info(
                "run %s already finished at step %d (%s); nothing to do", cfg.name, trainer.global_step, resume_path
            )
            return 0
        log.info(
            "resuming from %s at step %d (epoch %d, batch %d)",
            resume_path,
            trainer.global_step,
            trainer.epoch,
            trainer.step_in_epoch,
        )
    run_id = state.get("wandb_run_id") if state else new_run_id()
    trainer.extra_state = {"model_args": args, "config": to_dict(cfg), "wandb_run_id": run_id}
    if permutation is not None:
        trainer.extra_state["permutation"] = permutation  # evaluate and predict reuse this exact order
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.info("config:\n%s", to_yaml(cfg))
    trainer.logger = MetricsLogger(
        run_dir, enabled=info.is_main, wandb_cfg=cfg.wandb, run_name=cfg.name, config=to_dict(cfg), run_id=run_id
    )
    if state is not None:
        slurm = {k.lower(): os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT") if k in os.environ}
        trainer.logger.event(
            "resume", trainer.global_step, checkpoint=str(resume_path), world_size=info.world_size, **slurm
        )
    try:
        status = trainer.fit()
        if status == "finished" and info.is_main and trainer.last_eval_detail:
            written = _final_plots(cfg, run_dir, trainer.last_eval_detail, test_split)
            if written:
                log.info("plots: %s", ", ".join(str(p) for p in written.values()))
            trainer.logger.images(written, trainer.global_step)
    finally:
        trainer.logger.close()
    # Leave together: a rank that tears its process group down while rank 0 still draws plots
    # or flushes W&B has been seen to abort in gloo at exit.
    dist.barrier(info)
    if status == "stopped":
        took = time.monotonic() - trainer.stop.time if trainer.stop.time is not None else 0.0
        log.warning(
            "exiting %d (resumable) %.2fs after the stop request; rerun the same command to resume", EXIT_STOPPED, took
        )
        return EXIT_STOPPED
    metric = trainer.metric
    log.info(
        "done: test %s %.4f, loss %.4f (best %.4f)",
        metric,
        trainer.last_eval[metric],
        trainer.last_eval["loss"],
        trainer.best_for_log,
    )
    return 0


def _final_plots(cfg: Config, run_dir: Path, detail: dict[str, Any], test_split: Split) -> dict[str, Path]:
    common = dict(metrics_path=run_dir / "metrics.jsonl", predictions=detail["predictions"])
    if cfg.task == "sine_regression":
        return write_plots(run_dir / "plots", sine_inputs=test_split.images, sine_targets=test_split.labels, **common)
    return write_plots(
        run_dir / "plots",
        confusion=detail["confusion"],
        images=test_split.images,
        labels=test_split.labels,
        **common,
    )
