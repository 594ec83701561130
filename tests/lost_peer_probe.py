"""Real collective failures between 2 gloo ranks, for tests/e2e/test_lost_peer.py (run under torchrun).

    torchrun --nproc_per_node=2 tests/lost_peer_probe.py probe OUT_DIR
        each rank meets real exceptions (bugs, a silent peer, a SIGKILLed peer) and writes
        OUT_DIR/rank<R>.json: {case: {"type", "message", "lost"}}, ``lost`` as rnnddp.dist.lost_peer says
    torchrun --nproc_per_node=2 tests/lost_peer_probe.py job [train_ddp.py arguments]
        train_ddp.main as the entry point runs it (config, process group, exit codes), its ``run``
        replaced by a bug that raises a real DistError (QueueEmptyError) on every rank

Rank 1 SIGKILLs itself in the probe: pass torchrun a --monitor-interval of a second or more, so that
rank 0 has written its findings before torchrun takes it down.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from rnnddp import dist

SILENT_TIMEOUT_S = 1  # the short group's timeout: how long a silent peer is waited for


def _port_in_use_store() -> None:
    """A misconfiguration that torch reports as a DistNetworkError: a store on a port that another
    program listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tdist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=2))


def _empty_queue() -> None:
    """A bug that torch reports as a DistStoreError (QueueEmptyError): popping a queue nobody filled."""
    tdist.distributed_c10d._get_default_store().queue_pop(f"rnnddp-probe/{os.environ['RANK']}", block=False)


def _caught(fn) -> dict:
    try:
        fn()
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        return {"type": type(e).__name__, "message": lines[0][:300], "lost": dist.lost_peer(e)}
    return {"type": None, "message": "no error", "lost": False}


def probe(out: Path) -> None:
    info = dist.setup("gloo", timeout_s=60, peer_timeout_s=60)
    rank = info.rank
    short = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SILENT_TIMEOUT_S))
    found: dict[str, dict] = {}

    def write() -> None:
        (out / f"rank{rank}.json").write_text(json.dumps(found, indent=1))

    # Bugs, on both ranks. A collective misused: gloo refuses it with a plain RuntimeError.
    found["gloo_bug"] = _caught(lambda: tdist.all_gather_into_tensor(torch.empty(3), torch.ones(2)))
    # Bugs that torch reports as DistErrors: an empty store queue (QueueEmptyError, a DistStoreError),
    # a store on a port in use (DistNetworkError, EADDRINUSE).
    found["store_bug"] = _caught(_empty_queue)
    found["port_in_use"] = _caught(_port_in_use_store)
    dist.barrier(info)

    # A silent peer: rank 1 stays out of a collective for longer than the group's timeout.
    if rank == 0:
        found["peer_silent"] = _caught(lambda: tdist.all_reduce(torch.ones(1), group=short))
    else:
        time.sleep(SILENT_TIMEOUT_S + 1.0)
    dist.barrier(info)  # the long-timeout group: rank 0 waits for rank 1's sleep

    # A peer SIGKILLed while rank 0 waits for it in a training step: in the gradient exchange (DDP's
    # backward, through the job's own all-gather hook), then in the loss average after it.
    model = dist.wrap_ddp(torch.nn.Linear(4, 1), info, grad_sync="allgather")
    if rank == 1:
        write()
        time.sleep(0.2)  # rank 0 is in its backward by now (or meets the closed connection on entry)
        os.kill(os.getpid(), signal.SIGKILL)
    found["peer_killed_in_backward"] = _caught(lambda: model(torch.ones(2, 4)).sum().backward())
    found["peer_killed"] = _caught(lambda: dist.mean(torch.ones(1)))
    write()
    os._exit(0)  # the group is broken: no teardown that talks to the dead rank


def job(argv: list[str]) -> None:
    import train_ddp

    def broken_run(cfg, info) -> int:
        _empty_queue()
        return 0

    train_ddp.run = broken_run
    dist.fast_exit(train_ddp.main(argv))


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe(Path(sys.argv[2]))
    else:
        job(sys.argv[2:])
