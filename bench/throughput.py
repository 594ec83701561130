"""Training throughput of rnnddp against a tutorial-style baseline, a model-only ceiling and DDP; the job's fixed cost.

    python -m bench.throughput                          # every part: 2-3 minutes on 2 idle CPU cores
    python -m bench.throughput --quick                  # smoke test: about a minute
    python -m bench.throughput --skip ddp2,time_to_98.5 --steps 1000
    python -m bench.throughput --device cuda --precision bf16

Parts (same model, LSTM(28 -> hidden) + Linear(hidden, 10), and same batch unless flags change them):

  tutorial      torchvision MNIST + ToTensor + DataLoader(shuffle) + Adam + cross-entropy (bench/tutorial.py)
  rnnddp        the job's own step, built by rnnddp.job.build_trainer (autocast, scaler, clipping, LR schedule)
  ceiling       forward + backward + optimiser step on batches already on the device, with the job's model,
                optimiser and precision (rnnddp.train.precision: the scaler where the job scales)
  ddp2          train_ddp.py under torchrun, 2 ranks x 1 thread, against 1 rank x 1 thread (metrics.jsonl)
  time_to_98.5  wall time from launching the default job until its first validation accuracy >= 0.985
  fixed_cost    the default job (W&B offline, 100 steps): launch -> first step and last step -> exit, and a
                whole-process race of the tutorial program against the job on its config (2 epochs)
  gpu_epoch     (CUDA) LSTM-128, global batch 256, bf16, one epoch of row-MNIST with the data on the GPU
  pixel_epoch   the same on pixel-MNIST: 784 steps of 1 feature per image (on a CPU: fp32, extrapolated)

The harness (bench/harness.py) times the in-process parts in interleaved rounds and reports the
median round, and records how many cores other processes kept busy meanwhile. The process flushes
denormals to zero as the job does (train.flush_denormals), so the tutorial part runs with it too: at
28 steps that makes no measurable difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    DISTURBED_CORES,
    ForeignLoad,
    StepFn,
    environment,
    fmt_load,
    fmt_rate,
    forever,
    guarded,
    measure_interleaved,
    one_and_two_ranks,
    ratio,
    read_records,
    run_job,
    timed,
)
from bench.tutorial import TutorialLSTM
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config
from rnnddp.data.batches import Split
from rnnddp.data.mnist import locate_dataset
from rnnddp.dist import DistInfo, flush_denormals
from rnnddp.errors import UserError
from rnnddp.job import build_trainer
from rnnddp.launch import REPO, job_command, job_env
from rnnddp.models import build_model, place
from rnnddp.tasks import TASKS, Splits
from rnnddp.train.optim import build_optimizer
from rnnddp.train.precision import resolve_precision
from rnnddp.train.trainer import Trainer

DEFAULT_ROOT = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "bench_results" / "throughput.json"  # bench_results/ is git-ignored
PARTS = ("tutorial", "rnnddp", "ceiling", "ddp2", "time_to_98.5", "fixed_cost", "gpu_epoch", "pixel_epoch")
TARGET_ACCURACY = 0.985


@dataclass
class Settings:
    root: Path
    device: torch.device
    precision: str  # effective precision of the rnnddp and ceiling parts (fp32 on CPU)
    hidden: int
    batch: int
    steps: int  # timed steps per round (tutorial, rnnddp, ceiling)
    warmup: int  # untimed steps before the first round
    rounds: int
    ddp_steps: int
    t98_timeout_s: float
    extra: tuple[str, ...]  # --set: config overrides for rnnddp's parts (e.g. dist.grad_sync=allreduce)
    epoch_cap_s: float  # gpu/pixel epoch: extrapolate from a few timed steps when an epoch would take longer
    skip: frozenset[str]
    quick: bool
    out: Path


def job_config(overrides: list[str], s: Settings, run_dir: Path) -> Any:
    return load_config(
        [
            f"data.root={s.root}",
            "data.download=false",
            "wandb.mode=disabled",
            "resume=none",
            f"run_dir={run_dir}",
            *overrides,
        ]
    )


def load_splits(s: Settings) -> Splits:
    """The classify task's splits (as the job holds them), loaded once for every in-process part."""
    cfg = job_config([], s, Path(tempfile.gettempdir()))
    return TASKS["classify"](cfg, DistInfo()).load()


# -- a. tutorial baseline -----------------------------------------------------------------------
def tutorial_step_fn(raw_root: Path, s: Settings) -> StepFn:
    """The usual tutorial loop: per-sample PIL -> ToTensor in a DataLoader, then reshape to rows."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    # raw_root holds uncompressed IDX files: torchvision's MNIST will not read the .gz-only
    # (and read-only) shared copy without download=True, so it reads rnnddp's extracted cache.
    loader = DataLoader(MNIST(str(raw_root), train=True, transform=ToTensor()), batch_size=s.batch, shuffle=True)
    torch.manual_seed(0)
    model = TutorialLSTM(s.hidden).to(s.device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batches = forever(lambda _epoch: iter(loader))

    def step() -> int:
        images, labels = next(batches)
        images = images.reshape(-1, 28, 28).to(s.device)
        labels = labels.to(s.device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(labels)

    return step


# -- b. rnnddp's own path -----------------------------------------------------------------------
def matched_overrides(s: Settings) -> list[str]:
    """rnnddp config for the tutorial's job: same model, batch and optimiser, and no gradient
    clipping (the tutorial does not clip, nor does its config here, configs/seed_lstm.yaml).
    """
    return [
        "model.cell=lstm",
        f"model.hidden_size={s.hidden}",
        "model.num_layers=1",
        "model.bidirectional=false",
        f"train.global_batch_size={s.batch}",
        f"train.precision={s.precision}",
        "optim.name=adam",
        "optim.lr=0.01",
        "optim.weight_decay=0",
        "sched.name=constant",
        "sched.warmup_steps=0",
        "train.grad_clip=0",
        "data.normalize=false",
        *s.extra,
    ]


def build_rnnddp(overrides: list[str], splits: Splits, s: Settings, run_dir: Path) -> Trainer:
    """A single-process Trainer set up exactly as the job sets it up (rnnddp.job.build_trainer)."""
    cfg = job_config(overrides, s, run_dir)
    built = build_trainer(cfg, DistInfo(device=s.device), CheckpointManager(run_dir, writer=False), splits=splits)
    built.trainer.module.train()
    return built.trainer


def rnnddp_step_fn(trainer: Trainer) -> StepFn:
    stream = forever(trainer.batches.epoch)

    def step() -> int:
        batch = next(stream)
        trainer.train_step(batch)  # the job's real per-step code
        return len(batch[1])

    return step


# -- c. model-only ceiling ----------------------------------------------------------------------
def ceiling_step_fn(train_split: Split, s: Settings) -> StepFn:
    """Forward, backward and the optimiser step on 16 real batches converted and moved before timing starts.

    The model, optimiser (fused Adam) and precision rule (autocast, loss scaling) are the job's own.
    """
    cfg = job_config(matched_overrides(dataclasses.replace(s, extra=())), s, Path(tempfile.gettempdir()))
    task = TASKS["classify"](cfg, DistInfo(device=s.device))
    torch.manual_seed(0)
    model = place(build_model(task.model_args()), s.device)
    optimizer = build_optimizer(model, cfg.optim)
    precision = resolve_precision(cfg.train.precision, s.device)
    autocast, scaler = precision.autocast(), precision.grad_scaler()
    view = task.view.to(s.device)
    b = s.batch
    pool = [
        (
            view(train_split.inputs[i * b : (i + 1) * b].to(s.device)),
            train_split.targets[i * b : (i + 1) * b].to(s.device),
        )
        for i in range(16)
    ]
    cycle = itertools.cycle(pool)

    def step() -> int:
        x, y = next(cycle)
        loss = task.loss(model, (x, y), autocast)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return len(y)

    return step


# -- d, e. the real job in subprocesses ---------------------------------------------------------
def compute_bound(train_split: Split, s: Settings) -> dict[str, Any]:
    """What 2 ranks could reach with free communication: 2 x the model-only rate at half the batch.

    Measured in this process on one thread, like one rank: an LSTM step at batch B/2 costs more
    than half a step at B, so perfect scaling is out of reach before any byte is sent.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        half, full = dataclasses.replace(s, batch=s.batch // 2), dataclasses.replace(s, batch=s.batch)
        steps = {"half": ceiling_step_fn(train_split, half), "full": ceiling_step_fn(train_split, full)}
        rates = measure_interleaved(steps, s.device, s.steps, s.rounds, s.warmup)
    finally:
        torch.set_num_threads(threads)
    r_half, r_full = rates["half"]["samples_per_s"], rates["full"]["samples_per_s"]
    return {
        "half_batch_samples_per_s": r_half,
        "full_batch_samples_per_s": r_full,
        "speedup": round(2 * r_half / r_full, 3),
    }


def ddp_part(s: Settings, tmp: Path, train_split: Split) -> dict[str, Any]:
    """2 ranks x 1 thread against 1 rank x 1 thread, same global batch, from the job's own windows."""
    # Stay inside epoch 0: an epoch end evaluates and saves, and the trainer's next logging window
    # would include that time.
    steps = min(s.ddp_steps, len(train_split) // s.batch)
    log_every = max(10, min(50, steps // 8))
    overrides = [
        f"data.root={s.root}",
        *matched_overrides(s),
        f"train.max_steps={steps}",
        f"train.log_every_steps={log_every}",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        "wandb.mode=disabled",
        "resume=none",
    ]
    out: dict[str, Any] = {"steps": steps, "log_every_steps": log_every, "threads_per_rank": 1}
    out.update(one_and_two_ranks(overrides, tmp, "samples_per_s"))
    if s.device.type == "cpu":
        out["no_comm_bound"] = compute_bound(train_split, s)
    return out


def time_to_accuracy_part(s: Settings, tmp: Path) -> dict[str, Any]:
    """The default job, validated every 100 steps, stopped once a validation accuracy reaches the target."""
    run_dir = tmp / "time_to_target"
    overrides = [f"data.root={s.root}", "wandb.mode=disabled", "eval.every_steps=100", f"run_dir={run_dir}"]
    hit: dict[str, Any] = {}

    def reached() -> bool:
        for record in read_records(run_dir):
            if record.get("val/accuracy", -1.0) >= TARGET_ACCURACY:
                hit.update(record)
                return True
        return False

    load = ForeignLoad()
    # Threads as a user gets them: OMP_NUM_THREADS is left as this process found it.
    env = job_env(threads=None, WANDB_MODE="disabled")
    job = run_job(job_command(overrides), env, tmp / "time_to_target.log", s.t98_timeout_s, reached)
    reached()  # the process may have finished between the last poll and its exit
    evals = [r for r in read_records(run_dir) if "val/accuracy" in r]
    out: dict[str, Any] = {
        "target": TARGET_ACCURACY,
        "command": "python train_ddp.py " + " ".join(overrides),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "foreign_cores": load.cores(),
        "evals": [(r["step"], round(r["val/accuracy"], 4), round(r["time"] - job.launch_time, 1)) for r in evals],
    }
    if hit:
        out.update(seconds=round(hit["time"] - job.launch_time, 2), step=hit["step"], accuracy=hit["val/accuracy"])
    else:
        why = "time cap" if job.timed_out else f"finished (exit {job.returncode}) without reaching it"
        out.update(seconds=None, step=None, accuracy=max((r["val/accuracy"] for r in evals), default=None))
        out["not_reached"] = f"{why} after {job.wall_s:.0f} s"
        if job.returncode not in (0, None):
            out["error"] = job.tail()
    out["disturbed"] = (out["foreign_cores"] or 0) > DISTURBED_CORES
    return out


# -- f. the job's fixed cost ------------------------------------------------------------------
def fixed_cost_part(s: Settings, tmp: Path, raw_root: Path) -> dict[str, Any]:
    """Launch -> first training step and last step -> exit of the default job, and a whole-process race.

    The default config (W&B offline, as a user without a key gets it) cut to 100 steps: the fixed
    costs (imports, W&B start, data; the test of the final model, plots, W&B finish) do not depend
    on the run's length. The race: the tutorial program and the job on the tutorial's config, each
    for 2 epochs, launch to exit.
    """
    env = job_env(threads=None, WANDB_MODE="offline")
    out: dict[str, Any] = {}
    run_dir = tmp / "fixed_cost"
    overrides = [f"data.root={s.root}", "wandb.mode=offline", "train.max_steps=100", f"run_dir={run_dir}"]
    job = run_job(job_command(overrides), env, tmp / "fixed_cost.log", 300)
    events = {r["event"]: r["time"] for r in read_records(run_dir) if "event" in r}
    if job.returncode != 0 or "train_begin" not in events or "train_end" not in events:
        return {"failed": f"exit {job.returncode}; log tail:\n{job.tail()}"}
    exit_time = job.launch_time + job.wall_s
    out.update(
        command="python train_ddp.py " + " ".join(overrides[:-1]),
        startup_s=round(events["train_begin"] - job.launch_time, 2),
        teardown_s=round(exit_time - events["train_end"], 2),
        wall_s=round(job.wall_s, 2),
    )
    race: dict[str, Any] = {}
    tutorial = run_job(
        [sys.executable, "-m", "bench.tutorial", "--root", str(raw_root), "--epochs", "2", "--hidden", str(s.hidden)],
        env,
        tmp / "tutorial.log",
        600,
    )
    race["tutorial_s"] = round(tutorial.wall_s, 2) if tutorial.returncode == 0 else None
    matched = [
        *matched_overrides(s),
        f"data.root={s.root}",
        "train.epochs=2",
        "wandb.mode=offline",
        "train.log_every_steps=200",
    ]
    rnnddp = run_job(job_command([*matched, f"run_dir={tmp / 'race'}"]), env, tmp / "race.log", 600)
    race["rnnddp_s"] = round(rnnddp.wall_s, 2) if rnnddp.returncode == 0 else None
    race["speedup"] = ratio(race["tutorial_s"], race["rnnddp_s"])
    out["race_2_epochs"] = race
    return out


# -- epochs of LSTM-128 at batch 256 ------------------------------------------------------------
def epoch_part(splits: Splits, s: Settings, tmp: Path, pixel: bool) -> dict[str, Any]:
    """One epoch of rnnddp's step (LSTM-128, batch 256; on a GPU bf16 with the data there) after a warm-up."""
    cuda = s.device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    overrides = [
        *s.extra,  # first: the model, batch and precision below are what this part reports
        "model.cell=lstm",
        "model.hidden_size=128",
        "train.global_batch_size=256",
        f"train.precision={precision}",
        "data.device_resident=auto",
        f"data.view={'pixels' if pixel else 'rows'}",  # pixels: each image as 784 steps of one pixel
    ]
    trainer = build_rnnddp(overrides, splits, s, tmp / ("pixel" if pixel else "rows"))
    batches = trainer.batches
    n = batches.steps_per_epoch

    def run(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int) -> None:
        for _ in range(k):
            trainer.train_step(next(stream))

    warm = batches.epoch(0)
    # A CPU pixel step takes ~1 s: fewer probe steps keep the part around 15 s there.
    warm_steps, probe = (20, 50) if cuda else (3, 12)
    run(warm, warm_steps)  # cuDNN plans, allocator, fused Adam
    projected = timed(lambda: run(warm, probe), s.device) / probe * n
    out: dict[str, Any] = {"steps": n, "global_batch": 256, "hidden": 128, "precision": precision}
    if projected <= s.epoch_cap_s and n > warm_steps + probe:
        run(warm, n - warm_steps - probe)  # finish the warm-up epoch
        elapsed = timed(lambda: run(batches.epoch(1), n), s.device)
        out["timed"] = "one full epoch after a warm-up epoch"
    else:
        elapsed = projected
        out["timed"] = (
            f"EXTRAPOLATED from {probe} steps (after {warm_steps} warm-up steps): a full epoch would exceed "
            f"the {s.epoch_cap_s:.0f} s cap"
        )
    out.update(epoch_s=round(elapsed, 3), samples_per_s=round(n * 256 / elapsed, 1))
    return out


def table_rows(parts: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name in PARTS:
        p = parts.get(name)
        if p is None:
            continue
        if "skipped" in p:
            rows.append((name, "skipped", p["skipped"]))
            continue
        if "failed" in p:
            rows.append((name, "failed", p["failed"].splitlines()[-1][:100]))
            continue
        if name in ("tutorial", "rnnddp", "ceiling"):
            r = p["rounds_samples_per_s"]
            detail = f"median of {len(r)} x {p['steps_per_round']} steps (range {min(r):,.0f}-{max(r):,.0f}); {fmt_load(p['foreign_cores'])}"
            rows.append((name, fmt_rate(p["samples_per_s"]), detail))
        elif name == "ddp2":
            for label, title in (("one_rank", "ddp2: 1 rank x 1 thread"), ("two_ranks", "ddp2: 2 ranks x 1 thread")):
                e = p[label]
                if e.get("samples_per_s") is None:
                    rows.append((title, "failed", e.get("error", "").splitlines()[0][:100]))
                    continue
                detail = (
                    f"median of {len(e['windows_samples_per_s'])} windows of {p['log_every_steps']} steps "
                    f"(cv {e['window_cv']:.0%}), {p['steps']} steps; {fmt_load(e['foreign_cores'])}"
                )
                rows.append((title, fmt_rate(e["samples_per_s"]), detail))
        elif name == "fixed_cost":
            race = p.get("race_2_epochs", {})
            rows.append(("fixed_cost: launch -> first step", f"{p['startup_s']:.2f} s", "default job, W&B offline"))
            rows.append(("fixed_cost: last step -> exit", f"{p['teardown_s']:.2f} s", "test, plots, W&B finish"))
            detail = f"tutorial {race.get('tutorial_s')} s, rnnddp {race.get('rnnddp_s')} s (launch to exit)"
            rows.append(("whole process, 2 epochs", f"{race.get('speedup')}x", detail))
        elif name == "time_to_98.5":
            if p["seconds"] is None:
                rows.append(
                    (name, "None", f"{p['not_reached']}; best eval {p['accuracy']}; {fmt_load(p['foreign_cores'])}")
                )
            else:
                detail = f"first validation >= {p['target']} at step {p['step']} (acc {p['accuracy']:.4f}); {fmt_load(p['foreign_cores'])}"
                rows.append((name, f"{p['seconds']:.1f} s", detail))
        else:
            rows.append(
                (
                    name,
                    fmt_rate(p["samples_per_s"]),
                    f"epoch {p['epoch_s']:.2f} s over {p['steps']} steps; {p['timed']}",
                )
            )
    return rows


def headline(parts: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def rate(name: str) -> float | None:
        return parts.get(name, {}).get("samples_per_s")

    ddp = parts.get("ddp2", {})
    fixed = parts.get("fixed_cost", {})
    return {
        "startup_s": fixed.get("startup_s"),
        "teardown_s": fixed.get("teardown_s"),
        "whole_process_2_epochs/tutorial": (fixed.get("race_2_epochs") or {}).get("speedup"),
        "rnnddp/tutorial": ratio(rate("rnnddp"), rate("tutorial")),
        "rnnddp/ceiling": ratio(rate("rnnddp"), rate("ceiling")),
        "ddp2/one_rank": ddp.get("speedup_over_one_rank"),
        "ddp2_no_comm_bound": (ddp.get("no_comm_bound") or {}).get("speedup"),
        "ddp2_scaling_efficiency": ddp.get("scaling_efficiency"),
        "ddp2/tutorial": ratio(rate("ddp2"), rate("tutorial")),
    }


def print_report(parts: dict[str, dict[str, Any]], head: dict[str, Any]) -> None:
    rows = table_rows(parts)
    width = max(len(r[0]) for r in rows) if rows else 10
    print()
    print(f"{'part':<{width}}  {'samples/s':>10}  detail")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 40}")
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:>10}  {detail}")
    print()
    labels = {
        "rnnddp/tutorial": "rnnddp / tutorial",
        "rnnddp/ceiling": "rnnddp / ceiling",
        "ddp2/one_rank": "ddp2 / 1 rank",
        "ddp2_no_comm_bound": "ddp2 bound, free comm",
        "ddp2_scaling_efficiency": "ddp2 scaling efficiency",
        "ddp2/tutorial": "ddp2 / tutorial",
        "whole_process_2_epochs/tutorial": "whole process / tutorial",
    }
    for key, label in labels.items():
        value = head.get(key)
        shown = "-" if value is None else (f"{value:.0%}" if key == "ddp2_scaling_efficiency" else f"{value:.2f}x")
        print(f"  {label:<24} {shown}")
    disturbed = [name for name, p in parts.items() if p.get("disturbed")]
    if disturbed:
        print(f"  note: other processes were busy during {', '.join(disturbed)}; those figures are noisy")


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="folder holding MNIST/raw (IDX or .gz files)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=int, help="timed steps per round for tutorial/rnnddp/ceiling")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (median reported)")
    p.add_argument("--hidden", type=int, default=64, help="LSTM hidden size (tutorial, rnnddp, ceiling, ddp2)")
    p.add_argument("--batch", type=int, default=64, help="(global) batch size (tutorial, rnnddp, ceiling, ddp2)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="rnnddp and ceiling, CUDA only"
    )
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    p.add_argument("--ddp-steps", type=int, help="optimiser steps of each ddp2 run (capped at one epoch)")
    p.add_argument("--t98-timeout", type=float, help="seconds before time_to_98.5 gives up")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for rnnddp's parts")
    p.add_argument("--quick", action="store_true", help="few steps and short caps: a smoke test")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    a = p.parse_args(argv)

    skip = frozenset(x.strip() for x in a.skip.split(",") if x.strip())
    if unknown := skip - set(PARTS):
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    for flag in ("hidden", "batch", "steps", "rounds", "ddp_steps"):
        value = getattr(a, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if a.batch > 20_000:
        p.error("--batch must leave at least two batches per epoch")
    if device.type == "cpu" and a.precision != "fp32":
        print(f"note: --precision {a.precision} applies on CUDA only; the CPU parts run in fp32", file=sys.stderr)
    cuda = device.type == "cuda"
    # Defaults sized for 1-2 minutes on 2 idle CPU cores (--quick: under one); a busy machine
    # mostly stretches time_to_98.5, which gives up after --t98-timeout seconds.
    steps = a.steps or (100 if a.quick else (1000 if cuda else 400))
    return Settings(
        root=Path(a.root).expanduser(),
        device=device,
        precision=a.precision if cuda else "fp32",
        hidden=a.hidden,
        batch=a.batch,
        steps=steps,
        warmup=max(5, steps // 20),
        rounds=a.rounds or (2 if a.quick else 3),
        ddp_steps=a.ddp_steps or (200 if a.quick else 900),
        t98_timeout_s=a.t98_timeout or (30.0 if a.quick else 180.0),
        extra=tuple(a.set),
        epoch_cap_s=15.0 if a.quick else 60.0,
        skip=skip,
        quick=a.quick,
        out=Path(a.out),
    )


def main(argv: list[str]) -> int:
    s = parse_args(argv)
    flush_denormals(load_config(list(s.extra)).train.flush_denormals)  # before any tensor work, as the job
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    env = environment(s.device)
    print(
        f"torch {env['torch']} | {env['device']}: {env['device_name']} | CPUs {env['cpu_count']} "
        f"(usable {env['cpus_usable']}) | torch threads {env['torch_threads']} | {env['date']}"
    )
    print(f"model LSTM(28->{s.hidden}) + Linear({s.hidden},10), batch {s.batch}, precision {s.precision}")
    try:
        raw_root = locate_dataset("mnist", str(s.root), download=False)
        splits = load_splits(s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = s.device.type == "cuda"
    parts: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {name: "--skip" for name in s.skip}
    if not cuda:
        skipped.setdefault("gpu_epoch", "needs CUDA")
    elif torch.cuda.device_count() < 2:
        skipped.setdefault("ddp2", "needs 2 GPUs on CUDA")

    with tempfile.TemporaryDirectory(prefix="rnnddp_bench_") as tmp_name:
        tmp = Path(tmp_name)
        # a-c: build each part's step function, then time them interleaved.
        builders: dict[str, Callable[[], StepFn]] = {
            "tutorial": lambda: tutorial_step_fn(raw_root, s),
            "rnnddp": lambda: rnnddp_step_fn(build_rnnddp(matched_overrides(s), splits, s, tmp / "rnnddp")),
            "ceiling": lambda: ceiling_step_fn(splits.train, s),
        }
        step_fns: dict[str, StepFn] = {}
        for name, build in builders.items():
            if name in skipped:
                continue
            try:
                step_fns[name] = build()
            except Exception as e:  # as in guarded(): record the failure, run the rest
                traceback.print_exc()
                parts[name] = {"samples_per_s": None, "failed": f"{type(e).__name__}: {e}"}
        if step_fns:
            print(
                f"[bench] {', '.join(step_fns)}: {s.rounds} rounds x {s.steps} steps ...", file=sys.stderr, flush=True
            )
            measured = guarded(
                "in-process parts",
                lambda: {"parts": measure_interleaved(step_fns, s.device, s.steps, s.rounds, s.warmup)},
            )
            for name in step_fns:
                parts[name] = measured["parts"][name] if "parts" in measured else measured
        if "rnnddp" in parts and "samples_per_s" in parts["rnnddp"]:
            parts["rnnddp"]["grad_clip"] = load_config(matched_overrides(s)).train.grad_clip
        if "ddp2" not in skipped:
            parts["ddp2"] = guarded("ddp2", lambda: ddp_part(s, tmp, splits.train))
        if "time_to_98.5" not in skipped:
            parts["time_to_98.5"] = guarded("time_to_98.5", lambda: time_to_accuracy_part(s, tmp))
        if "fixed_cost" not in skipped:
            parts["fixed_cost"] = guarded("fixed_cost", lambda: fixed_cost_part(s, tmp, raw_root))
        if "gpu_epoch" not in skipped:
            parts["gpu_epoch"] = guarded("gpu_epoch", lambda: epoch_part(splits, s, tmp, pixel=False))
        if "pixel_epoch" not in skipped:
            parts["pixel_epoch"] = guarded("pixel_epoch", lambda: epoch_part(splits, s, tmp, pixel=True))
    for name, why in skipped.items():
        parts[name] = {"skipped": why}

    head = headline(parts)
    print_report(parts, head)
    settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in asdict(s).items()}
    settings["skip"] = sorted(s.skip)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(
        json.dumps({"environment": env, "settings": settings, "parts": parts, "headline": head}, indent=2) + "\n"
    )
    print(f"\nresults: {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
