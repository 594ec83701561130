"""Process group setup and teardown, device choice, and the few collectives the job uses.

The launcher (torchrun, ``accelerate launch``, srun + torchrun) sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain ``python train_ddp.py`` has none of them
and runs as one process without a process group. Rank checks live here, nowhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from rnnddp.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when no process group was created
    cpu_group: Any = None  # a gloo group for host-side votes (None: the default group is gloo)
    wait_group: Any = None  # a gloo group with the long timeout, for waiting on rank 0's own work

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(backend: str = "auto", timeout_s: int = 1800, peer_timeout_s: int = 60) -> DistInfo:
    """Read the launcher's environment, pick the device, and join the process group.

    Two timeouts: a collective that every rank enters at once (the gradient exchange, the stop
    vote, the loss average) fails after ``peer_timeout_s``: a rank that has not answered by then
    is taken as lost (its host died or its link is down), so it must outlast a checkpoint write,
    which the others wait for in the next step. Waiting while rank 0 alone works for long
    (validation, the final test, a data download) happens in ``wait_group``, whose collectives
    may take ``timeout_s``.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise UserError("dist.backend=nccl needs CUDA GPUs; none is visible here: use dist.backend=gloo (or auto)")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "lower --nproc_per_node to the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank, local_rank, world_size, device, "")
    # Under a launcher (RANK set) join a group even at world size 1: same code path as N ranks.
    if world_size > 1 or "RANK" in os.environ:
        timeout = datetime.timedelta(seconds=timeout_s)
        peer_timeout = datetime.timedelta(seconds=peer_timeout_s)
        store, _, _ = next(rendezvous("env://", rank, world_size, timeout=timeout))
        # After torchrun restarts workers (--max-restarts) with a static rendezvous, the store can
        # still hold the previous attempt's addresses, and gloo then dials a dead peer. Keys of
        # our own per attempt keep every attempt apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"rnnddp/attempt_{attempt}/", store)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=peer_timeout, **kwargs
        )
        info.backend = backend
        if backend == "nccl":
            info.cpu_group = dist.new_group(backend="gloo", timeout=peer_timeout)
        info.wait_group = dist.new_group(backend="gloo", timeout=timeout)
    return info


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank stopped answering: a
    connection it closed or reset, or no answer within ``dist.peer_timeout_s``. Decided by the
    message alone (``LOST_PEER_MARKERS``), not by the exception's type: gloo raises a plain
    RuntimeError for a lost peer and for a bug alike, and a ``DistError`` is no sign either (see
    there). Anything else, a collective misused by a bug included, is a crash: exit 1, traceback kept."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in LOST_PEER_MARKERS)


# What a lost peer's collective says: the one place that decides what exits 75 (resumable) and gets
# requeued. Seen on gloo with a killed host, a killed rank and a cut link (tests/e2e/test_hosts.py,
# tests/e2e/test_lost_peer.py); all arrive as a plain RuntimeError. Not every DistError belongs
# here: a DistBackendError is whatever the backend says, NCCL's "invalid argument" and "invalid
# usage" (bugs) as well as its remote error; a DistNetworkError can be a port already in use
# (EADDRINUSE); a DistStoreError can be an empty queue or a key nobody set.
LOST_PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",  # gloo: no answer within dist.peer_timeout_s
    "Application timeout caused pair closure",  # gloo: the collective after such a timeout
    "No route to host",
    # NCCL's own words (ncclRemoteError; the watchdog's timeout), from its library, not seen
    # here (no GPU): a DistBackendError with other words (invalid argument/usage) is a bug.
    "remote process exited or there was a network error",
    "Watchdog caught collective operation timeout",
)


def stop_with_launcher(launcher_pid: int, stop_signals: list[str]) -> None:
    """Under torchrun (or a multi-process ``accelerate launch``), get a stop signal when the launcher dies.

    torchrun starts each worker in a session of its own, so when torchrun alone is killed (the
    OOM killer, a hard kill by a scheduler) the workers would train on as orphans, still writing
    checkpoints into the run directory that a restarted job writes too. With this the kernel
    sends the first of ``train.stop_signals`` (SIGTERM if none), and training stops as on that
    signal: a checkpoint at the next step boundary, exit 75. ``launcher_pid`` is the parent's pid
    read at process start, before the slow imports. Linux only; a plain ``python train_ddp.py`` is
    left alone (it may be meant to outlive its shell).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    sig = signal.Signals[str(stop_signals[0])] if stop_signals else signal.SIGTERM
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig, 0, 0, 0) != 0:
        return  # not permitted here: the job runs as before
    if os.getppid() != launcher_pid:  # the launcher died before the request was in place
        os.kill(os.getpid(), sig)


def flush_denormals(enabled: bool = True) -> bool:
    """Treat denormal floats (below ~1.2e-38) as zero on the CPU; True if every compute thread does.

    Gradients that fade over hundreds of recurrent steps become denormals, and x86 cores compute on
    those far slower: LSTM-128 on the 784-step pixel view with PyTorch's init trains an order of
    magnitude faster with this on (docs/performance.md). The intra-op and BLAS threads copy the setting
    only when they start, so entry points call this before any tensor work.
    """
    if not enabled or not torch.set_flush_denormal(True):  # False: this CPU has no such mode
        return False
    return denormals_flushed()


def denormals_flushed() -> bool:
    """Whether every CPU compute thread now treats denormal floats as zero (a probe; it sets nothing)."""
    # Work split over the intra-op and BLAS threads whose results are denormal, from normal
    # inputs (1e-20 x 1e-19; 512 x 1e-44 in the matmul): a thread that does not flush leaves its
    # share non-zero. The matmul grows with the square of n, hence the cap.
    n = max(1, torch.get_num_threads())
    a = torch.full((min(n, 8) * 128, 512), 1e-22)
    probes = (torch.full((n * 65536,), 1e-20).mul_(1e-19), a @ a.T)
    return all(int(p.count_nonzero()) == 0 for p in probes)


def configure_cuda(tf32: bool) -> None:
    """cuDNN autotuning (fixed batch shapes) and TF32 for fp32 matmuls and cuDNN on Ampere and newer."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def fast_exit(code: int) -> None:
    """Exit with ``code`` after the exit handlers (logging's flush, W&B's teardown) but without the
    interpreter's own teardown, which takes about a second once torch is loaded (docs/performance.md).

    Falls back to a normal exit while a non-daemon thread still runs (Python would wait for it).
    """
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to lose
            stream.flush()
    os._exit(code)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier(info: DistInfo) -> None:
    """Wait for every rank, however long rank 0's own work takes (the long timeout)."""
    if _active():
        dist.barrier(group=info.wait_group)


def all_ok(ok: bool, info: DistInfo) -> bool:
    """True when every rank says ok; lets a rank that failed alone stop the others cleanly.

    In the wait group: the ranks may arrive far apart (rank 0 downloading the data, say)."""
    if not _active():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=info.wait_group)
    return flag.item() == 0.0


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True when any rank raised the flag (used to agree on a stop at a step boundary)."""
    return not all_ok(not flag, info)


def mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (in place when distributed)."""
    if _active():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def broadcast_from_main(values: list[float], info: DistInfo) -> list[float]:
    """Rank 0's numbers on every rank; the others wait (long timeout) while rank 0 computes them."""
    if not _active():
        return values
    buf = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(buf, src=0, group=info.wait_group)
    return buf.tolist()


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's object, on every rank (small objects only: RNG states)."""
    if not _active():
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def max_value(value: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over ranks (in place when distributed)."""
    if _active():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


class FlagVote:
    """Agree across ranks on a host-side flag (a stop request) without stalling each step.

    Every rank calls ``vote(flag)`` once per step; every ``every``-th call starts an all-reduce
    that runs in the background on a CPU (gloo) group and is read at the next such call. So all
    ranks see the same answer at the same step, at most ``2 * every`` steps after the flag went
    up, and none is left waiting alone in a collective. Voting at every step cost a small LSTM a
    noticeable share of its step on 2 CPU ranks; every 5th does not (docs/performance.md).
    """

    def __init__(self, info: DistInfo, every: int = 5) -> None:
        self.group = info.cpu_group
        self.every = every
        self._calls = 0
        self._work: Any = None
        self._buf = torch.zeros(1)

    def __call__(self, flag: bool) -> bool:
        if not _active():
            return flag
        self._calls += 1
        if self._calls % self.every:
            return False
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = self._buf.item() > 0
        self._buf = torch.tensor([1.0 if flag else 0.0])
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the vote in flight, so later collectives line up on every rank."""
        if self._work is not None:
            self._work.wait()
            self._work = None

    def abandon(self) -> None:
        """Forget the vote in flight without waiting for it (the job is failing; a peer may be gone)."""
        self._work = None


def allgather_mean_hook(group: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average gradients with one all-gather instead of an all-reduce.

    On gloo over a few ranks, a small bucket is latency-bound: gloo's ring all-reduce takes
    several message rounds, an all-gather one (docs/performance.md has the figures). Every rank
    sums the same gathered copies in rank order, so all ranks get bit-identical gradients. Each rank receives (W-1) buckets, so this pays only for small W.
    """
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    out = torch.empty(world * buf.numel(), dtype=buf.dtype, device=buf.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name since 2.12
    fut = gather(out, buf, group=group, async_op=True).get_future()

    def average(gathered: torch.futures.Future) -> torch.Tensor:
        # wait() raises the all-gather's error (a lost peer). A callback that skips it turns a failed
        # gather into a success: this rank steps on a half-filled buffer and goes on to the next
        # collective, while its ring neighbour still waits in this one for the chunks it will never
        # send; the two survivors then wait on each other until dist.peer_timeout_s.
        gathered.wait()
        return out.view(world, -1).sum(dim=0).div_(world)

    return fut.then(average)


# DDP checks a hook's annotations against the real classes; this module's are strings
# (``from __future__ import annotations``), so give it the objects.
allgather_mean_hook.__annotations__["bucket"] = dist.GradBucket
allgather_mean_hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


GRAD_SYNC = ("auto", "allreduce", "allgather")  # dist.grad_sync
BACKENDS = ("auto", "nccl", "gloo")  # dist.backend


def grad_sync_mode(mode: str, info: DistInfo) -> str:
    """allreduce | allgather for ``dist.grad_sync``; auto picks allgather on gloo with at most 4 ranks."""
    if mode == "auto":
        return "allgather" if info.backend == "gloo" and info.world_size <= 4 else "allreduce"
    return mode


def wrap_ddp(module: torch.nn.Module, info: DistInfo, grad_sync: str = "auto") -> torch.nn.Module:
    """The module DDP-wrapped when there are several ranks (with the gradient exchange ``grad_sync`` picks)."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if grad_sync_mode(grad_sync, info) == "allgather":
        model.register_comm_hook(None, allgather_mean_hook)
    return model
