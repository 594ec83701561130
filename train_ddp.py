"""Train a recurrent classifier on sequence-MNIST with DistributedDataParallel.

    python train_ddp.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=4 train_ddp.py train.epochs=3
    accelerate launch --num_processes 2 train_ddp.py --config configs/seed_lstm.yaml
    python train_ddp.py --help

Overrides are OmegaConf dotlist entries (key=value); see configs/default.yaml for every key.
Exit codes: 0 done (or already finished), 75 resumable: stopped by a signal after a checkpoint, or
another rank was lost (dist.peer_timeout_s) and the newest checkpoint stands; 3 the loss diverged,
2 bad input (one-line message), 1 unexpected error.
"""

from __future__ import annotations

import os

LAUNCHER_PID = os.getppid()  # before the slow imports: a launcher that dies during them still counts

import logging
import re
import sys

from rnnddp import dist
from rnnddp.config import load_config
from rnnddp.errors import EXIT_STOPPED, UserError
from rnnddp.job import run
from rnnddp.metrics import setup_logging


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    info = dist.DistInfo()
    broken = False
    try:
        cfg = load_config(argv)
        dist.stop_with_launcher(LAUNCHER_PID, list(cfg.train.stop_signals))
        dist.flush_denormals(cfg.train.flush_denormals)  # before any tensor work (see there)
        info = dist.setup(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.peer_timeout_s)
        setup_logging(info.is_main, info.rank)
        # Probed again, apart from the call above: the job checks its threads, not its own return value.
        cpu_main = info.is_main and info.device.type == "cpu"
        if cfg.train.flush_denormals and cpu_main and not dist.denormals_flushed():
            logging.getLogger("rnnddp").warning(
                "denormal floats are not flushed to zero on every CPU thread: long sequences may train slower"
            )
        return run(cfg, info)
    except UserError as e:
        # Every rank meets the same bad input; one line from rank 0 is enough.
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        logging.getLogger("rnnddp").warning("interrupted")
        return 130
    except Exception as e:
        if not (info.distributed and dist.lost_peer(e)):
            raise
        # A host died or its link went down: nothing to save collectively, and the newest checkpoint
        # on disk is complete (saves are atomic). Every surviving rank says so and exits resumable.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:200]  # gloo's "[source file:line]" prefix
        print(
            f"error: [rank {info.rank}] lost contact with another rank ({first}); the newest checkpoint "
            f"stands: rerun the same command to resume (exit {EXIT_STOPPED})",
            file=sys.stderr,
            flush=True,
        )
        broken = True  # leave the broken group without a teardown that talks to the lost rank
        return EXIT_STOPPED
    finally:
        if not broken:
            dist.teardown()


if __name__ == "__main__":
    dist.fast_exit(main(sys.argv[1:]))
