"""The benchmark harness: timing, machine load, the environment, subprocess jobs, report helpers.

Nothing here knows what is measured; ``bench/throughput.py`` holds the measured parts. Nothing
asserts on speed: figures are printed and written to JSON.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from rnnddp.launch import REPO

T = TypeVar("T")
StepFn = Callable[[], int]  # one optimiser step; returns the number of samples it consumed
DISTURBED_CORES = 0.25  # other processes busier than this (in cores) during a part: flag the figure
DISTURBED_CV = 0.20  # spread of a run's logging windows above this: flag the figure


# -- measurement --------------------------------------------------------------------------------
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


def measure_interleaved(
    steps: dict[str, StepFn], device: torch.device, per_round: int, rounds: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Warm every part up, then time them round-robin; report each part's median round.

    A burst of load from some other process then spoils one round rather than one part.
    """
    for step in steps.values():
        time_steps(step, warmup, device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    loads: dict[str, list[float | None]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            load = ForeignLoad()
            elapsed, samples = time_steps(step, per_round, device)
            rates[name].append(round(samples / elapsed, 1))
            loads[name].append(load.cores())
    return {
        name: {
            "samples_per_s": statistics.median(rates[name]),
            "rounds_samples_per_s": rates[name],
            "steps_per_round": per_round,
            "foreign_cores": loads[name],
        }
        for name in steps
    }


# -- the real job in subprocesses ---------------------------------------------------------------
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


# -- environment and report ---------------------------------------------------------------------
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


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    env: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    return env


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_load(cores: Any) -> str:
    values = [c for c in (cores if isinstance(cores, list) else [cores]) if c is not None]
    return f"others ~{max(values):.2f} cores" if values else ""


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; a failure is recorded in the results and the other parts still run."""
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        return fn()
    except Exception as e:  # a benchmark reports a broken part; it does not stop
        traceback.print_exc()
        return {"samples_per_s": None, "failed": f"{type(e).__name__}: {e}"}


def one_and_two_ranks(args: list[str], tmp: Path, rate: str) -> dict[str, Any]:
    """train_ddp.py with ``args`` on 1 rank x 1 thread and on 2 ranks x 1 thread (W&B off), each in a run
    directory of its own under ``tmp``: per launch the job's windows of ``train/<rate>`` (the first, which
    holds the warm-up, dropped), their median and spread; then the 2-rank figure, the speed-up, the scaling
    efficiency, and whether another process's load or uneven windows disturbed it."""
    from rnnddp.launch import job_command, job_env

    out: dict[str, Any] = {}
    for label, nproc in (("one_rank", 1), ("two_ranks", 2)):
        run_dir = tmp / f"ddp_{label}"
        load = ForeignLoad()
        env = job_env(threads=None, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
        job = run_job(job_command([*args, f"run_dir={run_dir}"], nproc), env, tmp / f"{label}.log", 300)
        rates = [r[f"train/{rate}"] for r in read_records(run_dir) if f"train/{rate}" in r]
        windows = rates[1:]  # the first window holds warm-up (allocator, first gloo collectives)
        entry: dict[str, Any] = {
            "nproc": nproc,
            "returncode": job.returncode,
            "wall_s": round(job.wall_s, 2),
            "foreign_cores": load.cores(),
            f"windows_{rate}": [round(r, 1) for r in windows],
        }
        if job.returncode != 0 or not windows:
            entry["error"] = f"exit {job.returncode}, {len(windows)} windows; log tail:\n{job.tail()}"
            entry[rate] = None
        else:
            entry[rate] = round(statistics.median(windows), 1)
            entry["window_cv"] = round(statistics.pstdev(windows) / statistics.mean(windows), 3)
        out[label] = entry
    one, two = out["one_rank"][rate], out["two_ranks"][rate]
    out[rate] = two
    out["speedup_over_one_rank"] = ratio(two, one)
    out["scaling_efficiency"] = round(two / (2 * one), 3) if one and two else None
    out["disturbed"] = any(
        (e.get("foreign_cores") or 0) > DISTURBED_CORES or (e.get("window_cv") or 0) > DISTURBED_CV
        for e in (out["one_rank"], out["two_ranks"])
    )
    return out
