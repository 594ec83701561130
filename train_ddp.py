"""Train a recurrent classifier on sequence-MNIST with DistributedDataParallel.

    python train_ddp.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=4 train_ddp.py train.epochs=3
    accelerate launch --num_processes 2 train_ddp.py --config configs/seed_lstm.yaml
    python train_ddp.py --help
    python train_ddp.py --check-world-size 2x4 --config configs/seed_lstm.yaml   # nodes x ranks per node

Overrides are OmegaConf dotlist entries (key=value); see configs/default.yaml for every key.
Exit codes: 0 done (or already finished), 75 resumable: stopped by a signal after a checkpoint, or
another rank was lost (dist.peer_timeout_s) and the newest checkpoint stands; 3 the loss diverged,
2 bad input (one-line message), 1 unexpected error (with a traceback; a collective that fails from a
bug is one, only a closed connection or a timeout is a lost rank: rnnddp.dist.lost_peer).
--check-world-size NODESxPER_NODE (or N ranks) trains nothing: exit 2 with one line when the config's
train.global_batch_size cannot be split evenly over that many ranks, else 0 (slurm/train.sbatch runs
it before it starts the job).
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

# gloo's "[source file:line]" prefix, and the future's wrapper when it failed in DDP's gradient hook
LOST_PEER_PREFIX = re.compile(r"^(?:Got the following error when running the callback: \w+: )?(?:\[[^\]]*\]\s*)?")


def check_world_size(spec: str, argv: list[str]) -> None:
    """UserError (one line) unless the config that ``argv`` selects splits its global batch evenly over
    the ranks ``spec`` names: ``NODESxPER_NODE`` (the fix then names an NPROC_PER_NODE that fits) or ``N``."""
    found = re.fullmatch(r"(?:(\d+)x)?(\d+)", spec)
    if not found or int(found[2]) < 1 or (found[1] is not None and int(found[1]) < 1):
        raise UserError(f"--check-world-size {spec!r}: give NODESxPER_NODE (e.g. 2x4) or a number of ranks")
    nodes, per_node = (int(found[1]), int(found[2])) if found[1] else (None, int(found[2]))
    world = (nodes or 1) * per_node
    batch = load_config(argv).train.global_batch_size
    if batch % world == 0:
        return
    if nodes is None:
        raise UserError(
            f"train.global_batch_size={batch} is not divisible by {world} ranks; set train.global_batch_size "
            f"to a multiple of {world} or run a number of ranks that divides {batch}"
        )
    fits = [p for p in range(per_node - 1, 0, -1) if batch % (nodes * p) == 0]
    fix = f" or NPROC_PER_NODE={fits[0]}" if fits else f" (no NPROC_PER_NODE splits {batch} over {nodes} nodes)"
    plural = "s" if nodes != 1 else ""
    raise UserError(
        f"train.global_batch_size={batch} is not divisible by {world} ranks ({nodes} node{plural} x {per_node}); "
        f"set train.global_batch_size to a multiple of {world}{fix}"
    )


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--check-world-size":
        try:
            check_world_size(argv[1] if len(argv) > 1 else "", argv[2:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
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
        first = LOST_PEER_PREFIX.sub("", first)[:200]
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
