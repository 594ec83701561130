"""Training throughput of rnnddp against a tutorial-style baseline, a model-only ceiling and DDP.

    python -m bench.throughput                          # every part: 1-2 minutes on 2 idle CPU cores
    python -m bench.throughput --quick                  # smoke test: under a minute
    python -m bench.throughput --skip ddp2,time_to_98.5 --steps 1000
    python -m bench.throughput --device cuda --precision bf16

Parts (same model, LSTM(28 -> hidden) + Linear(hidden, 10), and same batch unless flags change them):

  tutorial      torchvision MNIST + ToTensor + DataLoader(shuffle) + Adam + cross-entropy, written here
  rnnddp        rnnddp.data.TrainBatches + Trainer.train_step (autocast, scaler, clipping, LR schedule)
  ceiling       forward + backward + Adam on batches already on the device: no data work at all
  ddp2          train_ddp.py under torchrun, 2 ranks x 1 thread, against 1 rank x 1 thread (metrics.jsonl)
  time_to_98.5  wall time from launching the default job until its first eval/accuracy >= 0.985
  gpu_epoch     (CUDA) LSTM-128, global batch 256, bf16, one epoch of row-MNIST with the data on the GPU
  pixel_epoch   the same on pixel-MNIST: 784 steps of 1 feature per image (on a CPU: fp32, extrapolated)

The in-process parts (tutorial, rnnddp, ceiling) are timed in interleaved rounds and the median
round is reported, so a burst of load from some other process spoils one round rather than one
part. Every timed part also records how many cores *other* processes kept busy meanwhile (from
/proc/stat), which tells a quiet-machine figure from a disturbed one. Nothing asserts on speed.
The process flushes denormals to zero as the job does (train.flush_denormals), so the tutorial
part runs with it too: at 28 steps that makes no measurable difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config
from rnnddp.data import Split, TrainBatches, load_mnist, locate_mnist, to_sequences
from rnnddp.dist import DistInfo, flush_denormals
from rnnddp.errors import UserError
from rnnddp.job import build_trainer
from rnnddp.models import build_model
from rnnddp.trainer import Trainer, autocast_context

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "bench_results" / "throughput.json"  # bench_results/ is git-ignored
PARTS = ("tutorial", "rnnddp", "ceiling", "ddp2", "time_to_98.5", "gpu_epoch", "pixel_epoch")
TARGET_ACCURACY = 0.985
MNIST_TRAIN = 60_000
DISTURBED_CORES = 0.25  # other processes busier than this (in cores) during a part: flag the figure
DISTURBED_CV = 0.20  # spread of a run's logging windows above this: flag the figure

T = TypeVar("T")
StepFn = Callable[[], int]  # one optimiser step; returns the number of samples it consumed


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


# -- measurement helpers ------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForeignLoad:
    """Cores kept busy by processes other than this one and its children, since construction.

    Machine busy time comes from /proc/stat; ours from os.times(), whose children figures include
    every descendant once waited for (subprocess does that). Steal time counts as foreign: it is
    capacity this run did not get. None where /proc/stat is missing.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = ticks[3] + ticks[4]  # idle + iowait
        busy = (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return busy, ours, time.perf_counter()

    def cores(self) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        foreign = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return round(max(0.0, foreign / (end[2] - self._start[2])), 3)


def forever(epoch: Callable[[int], Iterator[T]]) -> Iterator[T]:
    """Chain epochs 0, 1, 2, ... of a per-epoch iterator (the timed runs may cross an epoch end)."""
    for e in itertools.count():
        yield from epoch(e)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds fn takes, the GPU work it queued included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_steps(step: StepFn, n: int, device: torch.device) -> tuple[float, int]:
    """Seconds and samples for n steps."""
    samples = 0

    def run() -> None:
        nonlocal samples
        samples = sum(step() for _ in range(n))

    return timed(run, device), samples


def measure_interleaved(steps: dict[str, StepFn], s: Settings) -> dict[str, dict[str, Any]]:
    """Warm every part up, then time them round-robin; report each part's median round."""
    for step in steps.values():
        time_steps(step, s.warmup, s.device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    loads: dict[str, list[float | None]] = {name: [] for name in steps}
    for _ in range(s.rounds):
        for name, step in steps.items():
            load = ForeignLoad()
            elapsed, samples = time_steps(step, s.steps, s.device)
            rates[name].append(round(samples / elapsed, 1))
            loads[name].append(load.cores())
    return {
        name: {
            "samples_per_s": statistics.median(rates[name]),
            "rounds_samples_per_s": rates[name],
            "steps_per_round": s.steps,
            "foreign_cores": loads[name],
        }
        for name in steps
    }


# -- a. tutorial baseline -----------------------------------------------------------------------
class TutorialLSTM(nn.Module):
    """The tutorials' model: LSTM over the 28 rows, Linear on the last step's output."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


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
    criterion = nn.CrossEntropyLoss()
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


def build_rnnddp(
    overrides: list[str], data: tuple[Split, Split], s: Settings, run_dir: Path, input_size: int = 28
) -> tuple[Trainer, TrainBatches]:
    """A single-process Trainer set up exactly as the job sets it up (rnnddp.job.build_trainer)."""
    cfg = load_config(
        [
            f"data.root={s.root}",
            "data.download=false",
            "wandb.mode=disabled",
            "resume=none",
            f"run_dir={run_dir}",
            *overrides,
        ]
    )
    info = DistInfo(device=s.device)
    trainer = build_trainer(cfg, info, *data, CheckpointManager(run_dir, writer=False), input_size=input_size)
    trainer.module.train()
    return trainer, trainer.train


def rnnddp_step_fn(trainer: Trainer, batches: TrainBatches) -> StepFn:
    stream = forever(batches.epoch)

    def step() -> int:
        x, y = next(stream)
        trainer.train_step(x, y)  # the job's real per-step code
        return len(y)

    return step


# -- c. model-only ceiling ----------------------------------------------------------------------
def ceiling_step_fn(train_split: Split, s: Settings) -> StepFn:
    """Forward, backward and Adam on 16 real batches converted and moved before timing starts."""
    torch.manual_seed(0)
    model = build_model(dict(cell="lstm", input_size=28, hidden_size=s.hidden, num_classes=10)).to(s.device)
    cuda = s.device.type == "cuda"
    if cuda:
        model.rnn.flatten_parameters()
    # fused Adam, as rnnddp uses: the ceiling should not be lower than what rnnddp can reach.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    autocast = autocast_context(s.precision, s.device)
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.precision == "fp16")
    b = s.batch
    pool = [
        (
            to_sequences(train_split.images[i * b : (i + 1) * b].to(s.device)),
            train_split.labels[i * b : (i + 1) * b].to(s.device),
        )
        for i in range(16)
    ]
    cycle = itertools.cycle(pool)

    def step() -> int:
        x, y = next(cycle)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return len(y)

    return step


# -- d, e. the real job in subprocesses ---------------------------------------------------------
@dataclass
class JobResult:
    returncode: int | None  # None: stopped by us (target reached or time cap)
    launch_time: float  # time.time() just before the process started
    wall_s: float
    timed_out: bool
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_command(overrides: list[str], nproc: int) -> list[str]:
    entry = str(REPO / "train_ddp.py")
    if nproc == 1:
        return [sys.executable, entry, *overrides]  # plain python: no process group, as users run it
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        entry,
        *overrides,
    ]


def job_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["WANDB_MODE"] = "disabled"  # belt and braces: never phone home from a benchmark
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_job(
    cmd: list[str], env: dict[str, str], log: Path, timeout_s: float, stop: Callable[[], bool] | None = None
) -> JobResult:
    """Run cmd with its output in log; end it early when stop() turns true or timeout_s passes."""
    timed_out = False
    with open(log, "w") as out:
        launch = time.time()
        start = time.perf_counter()
        # Own session: the whole tree (torchrun and its ranks) can be ended by this child's group id.
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                if stop is not None and stop():
                    break
                if time.perf_counter() - start > timeout_s:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                returncode = None
            else:
                returncode = proc.returncode
    return JobResult(returncode, launch, time.perf_counter() - start, timed_out, log)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a half-written last line (the job is still running) is skipped."""
    records = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def compute_bound(train_split: Split, s: Settings) -> dict[str, Any]:
    """What 2 ranks could reach with free communication: 2 x the model-only rate at half the batch.

    Measured in this process on one thread, like one rank: an LSTM step at batch B/2 costs more
    than half a step at B, so perfect scaling is out of reach before any byte is sent.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        half, full = dataclasses.replace(s, batch=s.batch // 2), dataclasses.replace(s, batch=s.batch)
        rates = measure_interleaved(
            {"half": ceiling_step_fn(train_split, half), "full": ceiling_step_fn(train_split, full)}, s
        )
    finally:
        torch.set_num_threads(threads)
    r_half, r_full = rates["half"]["samples_per_s"], rates["full"]["samples_per_s"]
    return {
        "half_batch_samples_per_s": r_half,
        "full_batch_samples_per_s": r_full,
        "speedup": round(2 * r_half / r_full, 3),
    }


def ddp_part(s: Settings, tmp: Path, train_split: Split | None = None) -> dict[str, Any]:
    """2 ranks x 1 thread against 1 rank x 1 thread, same global batch, from the job's own windows."""
    # Stay inside epoch 0: an epoch end evaluates and saves, and the trainer's next logging window
    # would include that time.
    steps = min(s.ddp_steps, MNIST_TRAIN // s.batch)
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
    for label, nproc in (("one_rank", 1), ("two_ranks", 2)):
        run_dir = tmp / f"ddp_{label}"
        load = ForeignLoad()
        job = run_job(job_command([*overrides, f"run_dir={run_dir}"], nproc), job_env(1), tmp / f"{label}.log", 300)
        rates = [r["train/samples_per_s"] for r in read_records(run_dir) if "train/samples_per_s" in r]
        windows = rates[1:]  # the first window holds warm-up (allocator, first gloo collectives)
        entry: dict[str, Any] = {
            "nproc": nproc,
            "returncode": job.returncode,
            "wall_s": round(job.wall_s, 2),
            "foreign_cores": load.cores(),
            "windows_samples_per_s": [round(r, 1) for r in windows],
        }
        if job.returncode != 0 or not windows:
            entry["error"] = f"exit {job.returncode}, {len(windows)} windows; log tail:\n{job.tail()}"
            entry["samples_per_s"] = None
        else:
            median = statistics.median(windows)
            entry["samples_per_s"] = round(median, 1)
            entry["window_cv"] = round(statistics.pstdev(windows) / statistics.mean(windows), 3)
        out[label] = entry
    one, two = out["one_rank"]["samples_per_s"], out["two_ranks"]["samples_per_s"]
    out["samples_per_s"] = two
    out["speedup_over_one_rank"] = round(two / one, 3) if one and two else None
    if train_split is not None and s.device.type == "cpu":
        out["no_comm_bound"] = compute_bound(train_split, s)
    out["scaling_efficiency"] = round(two / (2 * one), 3) if one and two else None
    out["disturbed"] = any(
        (e.get("foreign_cores") or 0) > DISTURBED_CORES or (e.get("window_cv") or 0) > DISTURBED_CV
        for e in (out["one_rank"], out["two_ranks"])
    )
    return out


def time_to_accuracy_part(s: Settings, tmp: Path) -> dict[str, Any]:
    """The default job, evaluated every 100 steps, stopped once an evaluation reaches the target."""
    run_dir = tmp / "time_to_target"
    overrides = [f"data.root={s.root}", "wandb.mode=disabled", "eval.every_steps=100", f"run_dir={run_dir}"]
    hit: dict[str, Any] = {}

    def reached() -> bool:
        for record in read_records(run_dir):
            if record.get("eval/accuracy", -1.0) >= TARGET_ACCURACY:
                hit.update(record)
                return True
        return False

    load = ForeignLoad()
    # Threads as a user gets them: OMP_NUM_THREADS is left as this process found it.
    job = run_job(job_command(overrides, 1), job_env(None), tmp / "time_to_target.log", s.t98_timeout_s, reached)
    reached()  # the process may have finished between the last poll and its exit
    evals = [r for r in read_records(run_dir) if "eval/accuracy" in r]
    out: dict[str, Any] = {
        "target": TARGET_ACCURACY,
        "command": "python train_ddp.py " + " ".join(overrides),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "foreign_cores": load.cores(),
        "evals": [(r["step"], round(r["eval/accuracy"], 4), round(r["time"] - job.launch_time, 1)) for r in evals],
    }
    if hit:
        out.update(seconds=round(hit["time"] - job.launch_time, 2), step=hit["step"], accuracy=hit["eval/accuracy"])
    else:
        why = "time cap" if job.timed_out else f"finished (exit {job.returncode}) without reaching it"
        out.update(seconds=None, step=None, accuracy=max((r["eval/accuracy"] for r in evals), default=None))
        out["not_reached"] = f"{why} after {job.wall_s:.0f} s"
        if job.returncode not in (0, None):
            out["error"] = job.tail()
    out["disturbed"] = (out["foreign_cores"] or 0) > DISTURBED_CORES
    return out


# -- epochs of LSTM-128 at batch 256 ------------------------------------------------------------
def epoch_part(data: tuple[Split, Split], s: Settings, tmp: Path, pixel: bool) -> dict[str, Any]:
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
    ]
    trainer, batches = build_rnnddp(overrides, data, s, tmp / ("pixel" if pixel else "rows"), 1 if pixel else 28)
    n = batches.steps_per_epoch

    def run(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int) -> None:
        for _ in range(k):
            x, y = next(stream)
            if pixel:
                x = x.reshape(x.shape[0], 784, 1)  # each image as 784 steps of one pixel
            trainer.train_step(x, y)

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


# -- report -------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def environment(s: Settings) -> dict[str, Any]:
    import torchvision

    env: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(s.device),
        "device_name": device_name(s.device),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
    }
    if s.device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    return env


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_load(cores: Any) -> str:
    values = [c for c in (cores if isinstance(cores, list) else [cores]) if c is not None]
    return f"others ~{max(values):.2f} cores" if values else ""


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
        elif name == "time_to_98.5":
            if p["seconds"] is None:
                rows.append(
                    (name, "None", f"{p['not_reached']}; best eval {p['accuracy']}; {fmt_load(p['foreign_cores'])}")
                )
            else:
                detail = f"first eval >= {p['target']} at step {p['step']} (acc {p['accuracy']:.4f}); {fmt_load(p['foreign_cores'])}"
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


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def headline(parts: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def rate(name: str) -> float | None:
        return parts.get(name, {}).get("samples_per_s")

    ddp = parts.get("ddp2", {})
    return {
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
    if a.batch > MNIST_TRAIN // 2:
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


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; a failure is recorded in the results and the other parts still run."""
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        return fn()
    except Exception as e:  # a benchmark reports a broken part; it does not stop
        traceback.print_exc()
        return {"samples_per_s": None, "failed": f"{type(e).__name__}: {e}"}


def main(argv: list[str]) -> int:
    s = parse_args(argv)
    flush_denormals(load_config(list(s.extra)).train.flush_denormals)  # before any tensor work, as the job
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    env = environment(s)
    print(
        f"torch {env['torch']} | {env['device']}: {env['device_name']} | CPUs {env['cpu_count']} "
        f"(usable {env['cpus_usable']}) | torch threads {env['torch_threads']} | {env['date']}"
    )
    print(f"model LSTM(28->{s.hidden}) + Linear({s.hidden},10), batch {s.batch}, precision {s.precision}")
    try:
        raw_root = locate_mnist(str(s.root), download=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = load_mnist(raw_root)
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
            "rnnddp": lambda: rnnddp_step_fn(*build_rnnddp(matched_overrides(s), data, s, tmp / "rnnddp")),
            "ceiling": lambda: ceiling_step_fn(data[0], s),
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
            measured = guarded("in-process parts", lambda: {"parts": measure_interleaved(step_fns, s)})
            for name in step_fns:
                parts[name] = measured["parts"][name] if "parts" in measured else measured
        if "rnnddp" in parts and "samples_per_s" in parts["rnnddp"]:
            parts["rnnddp"]["grad_clip"] = load_config(matched_overrides(s)).train.grad_clip
        if "ddp2" not in skipped:
            parts["ddp2"] = guarded("ddp2", lambda: ddp_part(s, tmp, data[0]))
        if "time_to_98.5" not in skipped:
            parts["time_to_98.5"] = guarded("time_to_98.5", lambda: time_to_accuracy_part(s, tmp))
        if "gpu_epoch" not in skipped:
            parts["gpu_epoch"] = guarded("gpu_epoch", lambda: epoch_part(data, s, tmp, pixel=False))
        if "pixel_epoch" not in skipped:
            parts["pixel_epoch"] = guarded("pixel_epoch", lambda: epoch_part(data, s, tmp, pixel=True))
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
