"""The rules of a resume, never silent: which settings may change, what extending a run means, which
checkpoint every rank loads, and when restarts that make no progress stop.

A rerun of a run directory that holds a checkpoint continues that run. Its config is compared with
the checkpoint's, key by key:

- keys in ``SAFE`` (and a task's ``RESUME_SAFE``) change how the run is watched, logged, saved,
  launched or where its files are, not what it computes: they are applied, and logged as such;
- ``train.epochs`` / ``train.max_steps`` may lengthen the run (an extension, see ``Changes``);
- any other difference is refused with one line naming the key, both values and the two fixes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as tdist

from rnnddp import checkpoint, dist
from rnnddp.config import saved_dict, to_dict
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.metrics import event_line
from rnnddp.train.optim import total_steps

log = logging.getLogger("rnnddp")

# Safe to change on resume: a key, or a section ending in "." (every key in it).
SAFE = (
    "name",  # a label (the W&B run's name): the run is its run_dir
    "run_dir",  # the folder moved
    "resume",  # how the checkpoint is found
    "train.log_every_steps",
    "train.max_nonfinite",
    "train.stop_signals",
    "train.flush_denormals",  # CPU speed
    "train.tf32",  # GPU speed (matmul precision, like another world size's summation order)
    "train.cuda_graph",  # the same step, replayed
    "train.precision",  # the same model's arithmetic on other hardware (a bf16 GPU run resumed on a CPU)
    "eval.",  # validation cadence and batch: what is measured, not what is trained
    "checkpoint.",  # save cadence, how many are kept
    "wandb.",
    "dist.",  # backend, timeouts, how gradients are averaged; the world size is the launcher's
    "debug.",  # fault injection for tests
)
LENGTH = ("train.epochs", "train.max_steps")  # may lengthen the run


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_safe(key: str, task_safe: tuple[str, ...] = ()) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in (*SAFE, *task_safe))


@dataclass
class Changes:
    """What differs from the checkpoint's config and is applied. An extension (``new_total`` >
    ``old_total``) re-plans the LR schedule over the new length: a schedule is a function of the step
    and the run's length (rnnddp/train/optim.py), so the steps already taken keep the LRs they had and
    the rest follow the longer schedule, exactly as a run configured that long from the start would
    from this step on (for ``constant``, the same run; ``cosine`` and ``onecycle`` jump to the longer
    curve's LR at this step)."""

    applied: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    old_total: int = 0
    new_total: int = 0

    @property
    def extends(self) -> bool:
        return self.new_total > self.old_total

    def describe(self) -> str:
        return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.applied.items())


def compare(saved: dict[str, Any], cfg: Any, path: Path, task_safe: tuple[str, ...], steps_per_epoch: int) -> Changes:
    """The checkpoint's stored config against this one: the changes that apply, or a UserError (one line)."""
    before, now = flatten(saved_dict(saved)), flatten(to_dict(cfg))
    differ = [k for k in now if before.get(k) != now[k]]
    old_total = total_steps(before["train.epochs"], before["train.max_steps"], steps_per_epoch)
    new_total = total_steps(cfg.train.epochs, cfg.train.max_steps, steps_per_epoch)
    refused = [k for k in differ if not is_safe(k, task_safe) and k not in LENGTH]
    if new_total < old_total:
        refused += [k for k in differ if k in LENGTH]
    if refused:
        key = refused[0]
        more = f" (also changed: {', '.join(refused[1:])})" if refused[1:] else ""
        why = f" (a run is lengthened, never shortened: {old_total} steps, now {new_total})" if key in LENGTH else ""
        raise UserError(
            f"checkpoint {path} was trained with {key}={_show(before[key])}, the config says {_show(now[key])}"
            f"{why}{more}; set {key}={_show(before[key])} to resume that run, or start a new run with name=NEW"
        )
    return Changes({k: (before[k], now[k]) for k in differ}, old_total, new_total)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


# -- one checkpoint for every rank ---------------------------------------------------------------


def agree_on_checkpoint(
    chosen: Path | None, error: str | None, manager: checkpoint.CheckpointManager, info: DistInfo
) -> Path | None:
    """Rank 0's pick (``chosen``, or its ``error``) on every rank, each checking that it reads the same bytes.

    The others get rank 0's file name (within their own ``checkpoints/`` when rank 0's pick is there) and
    its SHA-256; a rank that lacks it or reads other bytes (node-local or lagging storage) stops the job
    with one line naming the rank and the path. Ranks never pick for themselves.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        if error:
            raise UserError(error)
        return chosen
    digest = checkpoint.sha256_file(chosen) if info.is_main and chosen is not None else None
    inside = info.is_main and chosen is not None and chosen.parent.resolve() == manager.dir.resolve()
    message = [str(chosen) if chosen else None, inside, digest, error]
    tdist.broadcast_object_list(message, src=0, group=info.wait_group)
    name, inside, digest, error = message
    if error:
        raise UserError(error)
    if name is None:
        return None
    path = manager.dir / Path(name).name if inside else Path(name)
    reason = None
    if not info.is_main:
        if not path.is_file():
            reason = "it is not there"
        elif checkpoint.sha256_file(path) != digest:
            reason = "its bytes differ from rank 0's"
    reasons: list[Any] = [None] * info.world_size
    tdist.all_gather_object(reasons, reason, group=info.wait_group)
    for rank, why in enumerate(reasons):
        if why:
            raise UserError(
                f"rank {rank} cannot load {path}, the checkpoint rank 0 resumes from ({why}); every rank must "
                "read the same run directory: put run_dir= on storage that all nodes share"
            )
    return path


# -- restarts that make no progress -------------------------------------------------------------


def automatic_restart() -> bool:
    """Whether a scheduler or launcher started this attempt again (a SLURM requeue, a torchrun restart)."""
    return any(int(os.environ.get(k) or 0) > 0 for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))


def stalled_attempts(metrics: Path, step: int) -> int:
    """Earlier attempts, newest first and back to the last started by hand, that started at ``step`` as well."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    starts = []
    for line in lines:
        if '"event": "start"' in line:
            try:
                starts.append(json.loads(line))
            except ValueError:
                continue
    count = 0
    for record in reversed(starts):
        if record.get("step") != step:
            break
        count += 1
        if not record.get("automatic"):
            break
    return count


def check_progress(run_dir: Path, step: int, limit: int, info: DistInfo, checkpoint_path: Path | None) -> None:
    """Rank 0 notes this attempt's start in metrics.jsonl; an automatic restart that finds ``limit`` earlier
    attempts started from this same step stops every rank with one line (exit 2) instead of looping."""
    error = None
    metrics = run_dir / "metrics.jsonl"
    auto = automatic_restart()
    if info.is_main:
        stalled = stalled_attempts(metrics, step)
        if auto and limit and stalled >= limit:
            where = checkpoint_path or "the start"
            error = (
                f"{stalled} attempts in a row started from step {step} ({where}) without saving a newer checkpoint; "
                "not restarting again: read their log, fix the cause and rerun by hand (or raise "
                "dist.max_stalled_restarts)"
            )
            line = event_line("gave_up", step, attempts=stalled)
        else:
            line = event_line("start", step, automatic=auto, **_restart_counts())
        run_dir.mkdir(parents=True, exist_ok=True)
        with metrics.open("a") as f:
            f.write(line)
    if not dist.all_ok(error is None, info):
        raise UserError(error or "rank 0 stopped this restart: no progress since earlier attempts; see its message")


def _restart_counts() -> dict[str, int]:
    found = {
        k.lower(): int(os.environ[k]) for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT") if k in os.environ
    }
    return {k: v for k, v in found.items() if v}
