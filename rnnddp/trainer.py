"""The training loop: autocast, GradScaler, clipping, when to evaluate, log and save.

Everything that must survive a restart is in ``state_dict()``; the checkpoint manager writes
it and the metrics logger records numbers, so this file neither writes files nor calls wandb.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rnnddp import dist
from rnnddp.checkpoint import CheckpointManager
from rnnddp.data import Split, TrainBatches
from rnnddp.dist import DistInfo
from rnnddp.errors import NonFiniteLossError
from rnnddp.evaluate import evaluate
from rnnddp.metrics import MetricsLogger, fmt
from rnnddp.preemption import StopRequest
from rnnddp.sine import ChunkBatches, detach_state, evaluate_sine, map_state, merge_states, rank_state

log = logging.getLogger("rnnddp")
ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for this device; ``auto`` follows ``accelerate launch --mixed_precision``."""
    if precision == "auto":
        precision = ACCELERATE_PRECISION.get(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), "fp32")
    if precision == "fp16" and device.type != "cuda":
        log.warning("train.precision=fp16 needs a CUDA GPU; running in fp32 on %s", device.type)
        precision = "fp32"
    return precision


def autocast_context(precision: str, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; ``cache=False`` where CUDA graphs are captured (they refuse its cast cache)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def build_optimizer(model: nn.Module, cfg: Any, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: the Adam step may be recorded in a CUDA graph (train.cuda_graph)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        # The fused kernel on CPU too: its step takes ~90 us for LSTM-64 against ~220 us for the
        # default per-tensor loop, 7% of the whole training step on 2 cores.
        return cls(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            fused=True,
            capturable=capturable,
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: Any) -> float:
    """The LR multiplier at ``step`` (0-based): a pure function of the step, so resume is exact."""
    if cfg.name == "onecycle":
        # Cosine rise from lr/25 to lr over pct_start, cosine fall to lr/1e4 (OneCycleLR's shape).
        rise = max(1, round(cfg.pct_start * total_steps))
        lo, floor = 1 / 25, 1 / 25e4
        if step < rise:
            return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * step / rise))
        t = min(1.0, (step - rise) / max(1, total_steps - rise))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "cosine":
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


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
    def __init__(
        self,
        cfg: Any,
        info: DistInfo,
        module: nn.Module,
        train: TrainBatches | ChunkBatches,
        test: Split,
        *,
        checkpoints: CheckpointManager,
        logger: MetricsLogger | None = None,
    ) -> None:
        # Plain dataclasses, not OmegaConf nodes: the loop reads the config every step, and an
        # OmegaConf attribute lookup costs microseconds (~5% of a small LSTM's step on a CPU).
        cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
        self.cfg, self.info = cfg, info
        self.module = module  # unwrapped: evaluated and checkpointed
        self.model = (
            DDP(module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
            if info.distributed
            else module
        )
        if info.distributed and dist.grad_sync_mode(cfg.dist.grad_sync, info) == "allgather":
            self.model.register_comm_hook(None, dist.allgather_mean_hook)
        self.train, self.test = train, test
        self.checkpoints = checkpoints
        self.logger = logger or MetricsLogger("", enabled=False)
        self.extra_state: dict[str, Any] = {}  # model args, config, run id: stored, not used here
        self.precision = resolve_precision(cfg.train.precision, info.device)
        # The sine task: a hidden state carried between the chunks of a sequence, and MSE (lower
        # is better) instead of accuracy as the metric that picks best.pt.
        self.regression = cfg.task == "sine_regression"
        self.cuda_graph = cfg.train.cuda_graph and self._cuda_graph_usable()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0
        self.autocast = autocast_context(self.precision, info.device, cache=not self.cuda_graph)
        self.optimizer = build_optimizer(module, cfg.optim, capturable=self.cuda_graph)
        epochs_steps = cfg.train.epochs * train.steps_per_epoch
        self.total_steps = min(epochs_steps, cfg.train.max_steps) if cfg.train.max_steps else epochs_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, cfg.sched)
        )
        # Under bf16 autocast on CUDA, cuDNN's LSTM/GRU/RNN still run in fp16 (aten's AutocastRNN
        # casts them to half, measured on an H200), so their gradients need loss scaling too.
        scaled = self.precision == "fp16" or (self.precision == "bf16" and info.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=scaled)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.metric = "mse" if self.regression else "accuracy"
        self.best: float | None = None
        self.carry: Any = None
        self.last_eval: dict[str, float] = {}
        self.last_eval_detail: dict[str, Any] = {}  # rank 0: confusion matrix and predictions (for plots)
        self._window = _Window(info.device)

    def _cuda_graph_usable(self) -> bool:
        """train.cuda_graph needs one CUDA process and a fixed step; elsewhere it warns and runs eagerly."""
        if self.info.device.type != "cuda":
            why = "it needs a CUDA device"
        elif self.info.distributed:
            why = "it is not supported with several ranks (DDP) yet"
        elif self.regression:
            why = "the sine task's carried hidden state changes the model's call from chunk to chunk"
        elif self.cfg.optim.name not in ("adam", "adamw"):
            why = f"optim.name={self.cfg.optim.name} has no capturable fused step (use adam or adamw)"
        elif self.cfg.model.num_layers > 1 and self.cfg.model.dropout > 0:
            why = "cuDNN's dropout between LSTM layers keeps its own random state"
        elif self.cfg.debug.nonfinite_from_step:
            why = "debug.nonfinite_from_step changes the step from one step to the next"
        else:
            return True
        log.warning("train.cuda_graph=true ignored: %s; training without CUDA graphs", why)
        return False

    def _graphed_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The whole classify step (forward, backward, unscale, clip, AdamW, scaler update) as one CUDA graph.

        A small LSTM's step on a GPU is bound by kernel launches, not arithmetic: replaying the
        recorded kernels removes that cost (LSTM-128, batch 256, bf16 on an H100: 0.65-0.83 s an epoch
        eagerly, 0.10 s graphed).
        The first step runs eagerly (it creates the optimiser and scaler state the graph reads
        and writes in place); the second captures; every later one copies its batch into the
        graph's input buffers, writes this step's LR into the buffer the fused AdamW reads, and
        replays. The LR schedule stays a host-side float, so checkpoints look as without graphs.
        """
        if self._graph is None and self._eager_steps == 0:
            self._eager_steps += 1
            return self._step(x, y)
        if self._graph is None:
            self._capture(x, y)
        static_x, static_y = self._static
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        for group, lr in zip(self.optimizer.param_groups, self._lr, strict=True):
            lr.fill_(group["lr"])
        self._graph.replay()
        return self._static_loss.clone()  # the next replay overwrites the graph's own

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._static = (x.clone(), y.clone())
        self._lr = [torch.tensor(float(g["lr"]), device=x.device) for g in self.optimizer.param_groups]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Lazy per-stream set-up (cuBLAS/cuDNN workspaces) happens here, not during capture.
            # Forward and backward only: the weights and optimiser state are not touched.
            for _ in range(2):
                self.scaler.scale(self._loss(*self._static)).backward()
                self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self._lr, strict=True):
            group["lr"] = lr  # the captured AdamW reads the LR from this buffer at every replay
        self._graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self._graph, stream=side, capture_error_mode="thread_local"):
                self._static_loss = self._step(*self._static)
        finally:
            for group, value in zip(self.optimizer.param_groups, floats, strict=True):
                group["lr"] = value
        log.info("train.cuda_graph: captured the training step for batches of %s", tuple(x.shape))

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
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
            # Mid-sequence (sine task): the carried state of the whole global batch, in its order.
            "carry": merge_states(dist.gather_objects(map_state(torch.Tensor.cpu, self.carry), self.info)),
            **self.extra_state,
        }

    @property
    def best_for_log(self) -> float:
        """The best eval result so far, NaN while there is none (every result so far was NaN)."""
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
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # else: the checkpoint ran without loss scaling (fp32/CPU); start the scaler fresh.
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        best = state.get("best_metric", state.get("best_accuracy"))  # older checkpoints: accuracy or -1
        self.best = None if best is None or best < 0 else best
        self.carry = rank_state(state.get("carry"), self.info.rank, self.info.world_size, self.info.device)
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            # The data order does not depend on the world size (see data.py), so the position
            # is exact; only per-rank random streams (dropout) cannot be carried over.
            log.warning(
                "checkpoint was written by %d ranks, resuming on %d: data position is exact, "
                "per-rank random streams are re-seeded",
                len(rngs),
                self.info.world_size,
            )
            torch.manual_seed(self.cfg.seed + 1000 * self.global_step + self.info.rank)
        if self.info.device.type == "cuda" and hasattr(self.module, "rnn"):
            self.module.rnn.flatten_parameters()

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    # -- loop -------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, new_sequence: bool = False) -> torch.Tensor:
        """One optimiser step; for the sine task, on one chunk with the state carried from the last."""
        if self.regression:
            with self.autocast:
                out, state = self.model(x, None if new_sequence else self.carry)
            self.carry = detach_state(state)  # truncated BPTT: no gradient into earlier chunks
            loss = self._nonfinite_injection(F.mse_loss(out.float(), y))
            self._update(loss)
        elif self.cuda_graph:
            loss = self._graphed_step(x, y)
        else:
            loss = self._step(x, y)
        self.scheduler.step()
        return loss.detach()

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            logits = self.model(x)
        return self._nonfinite_injection(F.cross_entropy(logits.float(), y))

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._loss(x, y)
        self._update(loss)
        return loss.detach()

    def _nonfinite_injection(self, loss: torch.Tensor) -> torch.Tensor:
        if self.cfg.debug.nonfinite_from_step and self.global_step + 1 >= self.cfg.debug.nonfinite_from_step:
            return loss * float("nan")
        return loss

    def _update(self, loss: torch.Tensor) -> None:
        """Backward and the optimiser step: no host sync, so a CUDA graph can hold it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def fit(self) -> str:
        """Train to the end ("finished") or to an agreed stop request ("stopped", checkpoint saved)."""
        cfg, info = self.cfg, self.info
        log.info(
            "training %d steps (%d epochs x %d steps, global batch %d over %d rank(s)), precision %s, device %s",
            self.total_steps,
            cfg.train.epochs,
            self.train.steps_per_epoch,
            cfg.train.global_batch_size,
            info.world_size,
            self.precision,
            info.device,
        )
        self.stop = StopRequest(list(cfg.train.stop_signals))
        vote = dist.FlagVote(info)
        bar = self._progress_bar()
        self._window.reset()
        self.module.train()
        try:
            while not self.finished:
                for batch in self.train.epoch(self.epoch, self.step_in_epoch):
                    self._window.add(self.train_step(*batch))
                    self.step_in_epoch += 1
                    self.global_step += 1
                    if bar is not None:
                        bar.update(1)
                    self._maybe_inject_fault()
                    if vote(self.stop.requested):
                        vote.close()
                        self._log_window(bar)
                        self._save()
                        dist.barrier(info)  # nobody exits while rank 0 still writes (other nodes' torchrun)
                        log.warning(
                            "stopped on %s at step %d: checkpoint saved",
                            self.stop.name or "a peer's signal",
                            self.global_step,
                        )
                        self.logger.event("stopped", self.global_step, signal=self.stop.name)
                        return "stopped"
                    self._after_step(bar)
                    if self.finished:
                        break
        finally:
            vote.close()
            self.stop.close()
            if bar is not None:
                bar.close()
        self.logger.summary({f"best_{self.metric}": self.best, **{f"final/{k}": v for k, v in self.last_eval.items()}})
        return "finished"

    def _after_step(self, bar: Any) -> None:
        """Log, evaluate and save when this step calls for it."""
        cfg = self.cfg
        last_of_epoch = self.step_in_epoch == self.train.steps_per_epoch
        if _every(self.global_step, cfg.train.log_every_steps) or last_of_epoch or self.finished:
            self._log_window(bar)
        if last_of_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        boundary = last_of_epoch or self.finished
        do_eval = boundary or _every(self.global_step, cfg.eval.every_steps)
        do_save = boundary or _every(self.global_step, cfg.checkpoint.every_steps)
        new_best = self._evaluate() if do_eval else False
        if do_save or new_best:
            self._save(best=new_best)
        if do_eval or do_save or new_best:
            self._window.start = time.perf_counter()  # samples/s counts training time only

    def _log_window(self, bar: Any) -> None:
        """Average the loss since the last log over ranks, record it, and check for divergence."""
        w = self._window
        if w.steps == 0:
            return
        elapsed = time.perf_counter() - w.start
        loss = dist.mean(w.loss_sum / w.steps).item()
        worst_run = dist.max_value(w.bad_max.float()).item()
        samples_s = w.steps * self.cfg.train.global_batch_size / max(elapsed, 1e-9)
        metrics = {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_s": samples_s,
            "epoch": self.epoch + self.step_in_epoch / self.train.steps_per_epoch,
        }
        self.logger.log(metrics, self.global_step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_s:.0f}")
        else:
            log.info("step %d %s", self.global_step, fmt(metrics))
        self._check_finite(worst_run)
        w.reset()

    def _check_finite(self, worst_run: float) -> None:
        """Stop after train.max_nonfinite consecutive non-finite losses (with a GradScaler it skips those steps)."""
        limit = self.cfg.train.max_nonfinite
        if not self.scaler.is_enabled() and limit and worst_run >= limit:
            latest = self.checkpoints.find_latest() if self.info.is_main else None
            raise NonFiniteLossError(
                f"loss was not finite for {int(worst_run)} consecutive steps (by step {self.global_step}); "
                f"lower optim.lr or set train.grad_clip; the last good checkpoint is {latest or 'none'}"
            )

    def _maybe_inject_fault(self) -> None:
        dbg = self.cfg.debug
        if (
            dbg.fail_at_step
            and self.global_step == dbg.fail_at_step
            and self.info.rank == dbg.fail_rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        ):
            log.error("debug.fail_at_step: killing rank %d at step %d", self.info.rank, self.global_step)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _evaluate(self) -> bool:
        """Rank 0 evaluates the unwrapped module; the others wait in the broadcast of its result.

        Returns whether this is the best result so far (the same answer on every rank).
        """
        result = torch.zeros(2, device=self.info.device, dtype=torch.float64)
        if self.info.is_main:
            m = self._evaluate_here()
            self.last_eval_detail = {k: m[k] for k in ("confusion", "predictions") if k in m}
            result = torch.tensor([m["loss"], m[self.metric]], device=self.info.device, dtype=torch.float64)
        loss, value = dist.broadcast(result).tolist()
        better = self.best is None or (value < self.best if self.regression else value > self.best)
        new_best = better and not math.isnan(value)  # a NaN MSE must not become the bar to beat
        if new_best:
            self.best = value
        self.last_eval = {"loss": loss, self.metric: value}
        best = self.best_for_log
        metrics = {
            "eval/loss": loss,
            f"eval/{self.metric}": value,
            f"eval/best_{self.metric}": best,
            "epoch": self.epoch,
        }
        self.logger.log(metrics, self.global_step)
        log.info("eval step %d: loss %.4f %s %.4f (best %.4f)", self.global_step, loss, self.metric, value, best)
        return new_best

    def _evaluate_here(self) -> dict[str, Any]:
        common = dict(batch_size=self.cfg.eval.batch_size, device=self.info.device, autocast=self.autocast)
        if self.regression:
            return evaluate_sine(self.module, self.test, predictions=True, **common)
        return evaluate(
            self.module,
            self.test,
            normalize=self.cfg.data.normalize,
            view=self.train.view,
            permutation=self.train.permutation,
            dataset=self.train.dataset,
            num_classes=getattr(self.module, "args", {}).get("num_classes", 10),
            predictions=True,
            **common,
        )

    def _save(self, best: bool = False) -> None:
        # A model that just produced a non-finite loss is never written: latest stays good.
        if dist.max_value(self._window.bad_run.float()).item() > 0:
            log.warning("not saving step %d: the last loss was not finite", self.global_step)
            return
        state = self.state_dict()  # every rank joins: RNG states are gathered
        path = self.checkpoints.save(state, self.global_step, best=best)
        if path is not None:
            log.info("saved %s%s", path, " (best)" if best else "")

    def _progress_bar(self) -> Any:
        if not (self.info.is_main and sys.stdout.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True)
