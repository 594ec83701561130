"""Peak memory per rank when a prepared data set larger than memory trains: 2 torchrun ranks, one epoch.

    python -m bench.memory [--gib 2.1] [--eval-gib 0] [--step-classes 0] [--limit-gib 1.5] [--dir /tmp]

Writes a synthetic prepared folder whose training features take ``--gib`` GiB (40 features,
300-700 steps per sequence; written in chunks, never whole in memory), and its validation and test
features ``--eval-gib`` GiB each (0: 256 sequences each), then trains an LSTM-16 on it for one
epoch with 2 ranks, inside a cgroup v1 memory limit of ``--limit-gib`` (0: no limit; root only);
rank 0 then validates and tests it. A class per sequence (``sequence_classification``), or with
``--step-classes C`` one of C classes at every step (``step_classification``). While the job runs
it reads each rank's ``/proc/PID/status``: the peak resident set (``VmHWM``, mapped file pages
included) and the largest anonymous part seen (``RssAnon``: the process's own memory, what a
mapped data set does not add to). The data set's pages are evicted from the page cache first, so
the job reads them under its own limit. Printed, not asserted. tests/e2e/test_larger_than_memory.py
runs the same under its limit and checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rnnddp.data.sequences import SplitArrays, pack, write_prepared
from rnnddp.launch import REPO, job_command, job_env

GIB = 1 << 30
FEATURES = 40
MEMORY = Path("/sys/fs/cgroup/memory")


def small_split(rng: np.random.Generator, n: int, step_classes: int = 0) -> SplitArrays:
    lengths = rng.integers(300, 700, size=n)
    x = [rng.standard_normal((int(t), FEATURES), dtype=np.float32) for t in lengths]
    if step_classes:
        return pack(x, None, [rng.integers(0, step_classes, int(t)) for t in lengths])
    return pack(x, rng.integers(0, 2, n), None)


def big_split(scratch: Path, size: int, rng: np.random.Generator, step_classes: int = 0) -> SplitArrays:
    """A split whose features take about ``size`` bytes, in the mapped file ``scratch``, written in chunks
    (no more memory than one chunk); labels, or with ``step_classes`` a class at every step."""
    lengths = rng.integers(300, 700, size=size // (4 * FEATURES * 500))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    features = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), FEATURES))
    for start in range(0, len(features), 1 << 20):
        part = features[start : start + (1 << 20)]
        part[:] = rng.standard_normal(part.shape, dtype=np.float32)
    features.flush()
    if step_classes:
        return SplitArrays(features, offsets, targets=rng.integers(0, step_classes, int(offsets[-1])))
    return SplitArrays(features, offsets, rng.integers(0, 2, len(lengths)))


def big_prepared(folder: Path, size: int, seed: int = 0, eval_size: int = 0, step_classes: int = 0) -> tuple[Path, int]:
    """A prepared folder under ``folder`` whose train features take about ``size`` bytes: (path, train sequences).

    Validation and test: ``eval_size`` bytes of features each, or 256 sequences each when 0. A class per
    sequence (2 classes), or with ``step_classes`` one of that many at every step. The features go to
    mapped scratch files in chunks, so writing needs no more memory than one chunk.
    """
    rng = np.random.default_rng(seed)
    splits = {"train": big_split(folder / "train.src.npy", size, rng, step_classes)}
    for name in ("val", "test"):
        splits[name] = (
            big_split(folder / f"{name}.src.npy", eval_size, rng, step_classes)
            if eval_size
            else small_split(rng, 256, step_classes)
        )
    names = [f"c{c}" for c in range(step_classes)] if step_classes else ["a", "b"]
    data = write_prepared(folder / "big", splits, names, {})
    sequences = len(splits["train"])
    del splits
    for scratch in folder.glob("*.src.npy"):
        scratch.unlink()
    drop_cached(data)
    return data, sequences


def drop_cached(folder: Path) -> None:
    """Evict ``folder``'s files from the page cache (they are on disk: write_prepared synced them).

    Cached pages stay charged to the cgroup that first read or wrote them (here, this process's);
    evicted, they are read back by the job and count against the job's own limit.
    """
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A cgroup v1 memory group with ``limit`` bytes (page cache included, no swapping past it); removed after."""
    group = MEMORY / f"rnnddp-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # swap accounting: no swapping past the limit either
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        for _ in range(100):  # the job's processes leave the group as they exit
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def train_args(data: Path, run_dir: Path, task: str = "sequence_classification") -> list[str]:
    return [
        f"task={task}", f"sequences.path={data}", "model.hidden_size=16",
        "train.epochs=1", "train.global_batch_size=64", "train.log_every_steps=50", "eval.batch_size=256",
        "wandb.mode=disabled", f"run_dir={run_dir}",
    ]  # fmt: skip


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def watch_ranks(proc: subprocess.Popen, every: float = 0.1, launcher: bool = False) -> dict[int, dict[str, int]]:
    """Until ``proc`` (torchrun) exits: per rank process (and torchrun's own with ``launcher``), the last VmHWM
    and the largest RssAnon/RssFile seen (KiB)."""
    seen: dict[int, dict[str, int]] = {}
    while proc.poll() is None:
        for pid in _children(proc.pid) + ([proc.pid] if launcher else []):
            now = _status_kib(pid)
            if now:
                top = seen.setdefault(pid, {})
                for key, v in now.items():
                    top[key] = max(top.get(key, 0), v)
        time.sleep(every)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.125, help="training features, GiB")
    p.add_argument(
        "--eval-gib", type=float, default=0, help="validation and test features, GiB each (0: 256 sequences)"
    )
    p.add_argument(
        "--step-classes", type=int, default=0, help="C > 0: one of C classes at every step (0: per sequence)"
    )
    p.add_argument("--limit-gib", type=float, default=1.5, help="the job's memory limit (cgroup v1), 0: none")
    p.add_argument("--dir", default=None, help="where to write the data set (default: the temporary folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rnnddp-bench-memory-", dir=a.dir) as tmp:
        data, sequences = big_prepared(Path(tmp), int(a.gib * GIB), eval_size=int(a.eval_gib * GIB),
                                       step_classes=a.step_classes)  # fmt: skip
        size = {s: (data / f"{s}.features.npy").stat().st_size for s in ("train", "val", "test")}
        task = "step_classification" if a.step_classes else "sequence_classification"
        limit = int(a.limit_gib * GIB)
        with memory_cgroup(limit) if limit else contextlib.nullcontext() as group:
            enter = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
            start = time.perf_counter()
            proc = subprocess.Popen(
                job_command(train_args(data, Path(tmp) / "run", task), nproc=2), env=job_env(), cwd=REPO,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=enter,
            )  # fmt: skip
            ranks = watch_ranks(proc)
            err = proc.stderr.read() if proc.stderr else ""
            took = time.perf_counter() - start
            peak = int((group / "memory.max_usage_in_bytes").read_text()) if group else 0
    if proc.returncode != 0:
        raise SystemExit(f"the job exited {proc.returncode}:\n{err[-2000:]}")
    where = f"inside a {a.limit_gib:g} GiB cgroup limit (peak use {peak / GIB:.2f} GiB)" if limit else "no limit"
    print(
        f"{task}: train features {size['train'] / GIB:.2f} GiB ({sequences} sequences), validation "
        f"{size['val'] / GIB:.2f} GiB, test {size['test'] / GIB:.2f} GiB; 2 ranks, one epoch, {took:.0f} s, {where}"
    )
    print("| rank process | peak RSS (VmHWM) | largest RssAnon | largest RssFile |")
    print("| --- | --- | --- | --- |")
    for pid, kib in sorted(ranks.items()):
        mib = {k: v / 1024 for k, v in kib.items()}
        print(f"| {pid} | {mib['VmHWM']:,.0f} MiB | {mib['RssAnon']:,.0f} MiB | {mib['RssFile']:,.0f} MiB |")


if __name__ == "__main__":
    main()
