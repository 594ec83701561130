"""Lost peer or bug: real gloo collectives between 2 torchrun ranks, classified by rnnddp.dist.lost_peer.

Only a connection closed or reset by a peer, or a peer silent past the timeout, is a lost peer (exit
75, resumable, requeued under SLURM); a collective or store that fails from a bug is a crash (exit 1,
traceback kept), DistError or not. tests/lost_peer_probe.py makes the failures; no MNIST needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port, job_env, worker_exit_codes

PROBE = REPO / "tests" / "lost_peer_probe.py"


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--monitor-interval=2",  # rank 0 reports its peer's death before torchrun takes it down
        str(PROBE),
        *args,
    ]


def test_real_gloo_errors_from_bugs_are_not_lost_peers_and_a_killed_or_silent_peer_is(tmp_path: Path) -> None:
    proc = subprocess.run(
        _torchrun("probe", str(tmp_path)), env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    found = {r: tmp_path / f"rank{r}.json" for r in (0, 1)}
    assert all(p.is_file() for p in found.values()), proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = {r: json.loads(p.read_text()) for r, p in found.items()}
    for rank, cases in ranks.items():
        # A misused collective (gloo's own check), an empty store queue (a DistStoreError), a store on a
        # port in use (a DistNetworkError): real errors, each a bug, none a lost peer.
        assert cases["gloo_bug"]["type"] == "RuntimeError", cases
        assert "invalid tensor size" in cases["gloo_bug"]["message"], cases
        assert cases["store_bug"]["type"] == "QueueEmptyError", cases
        assert cases["port_in_use"]["type"] == "DistNetworkError", cases
        assert "EADDRINUSE" in cases["port_in_use"]["message"], cases
        bugs = {name: c for name, c in cases.items() if name in ("gloo_bug", "store_bug", "port_in_use") and c["lost"]}
        assert not bugs, f"rank {rank}: errors from bugs taken for a lost peer: {bugs}"
    # Rank 0 waited for rank 1: past the timeout while rank 1 slept, then in a training step's gradient
    # exchange and loss average while rank 1 was SIGKILLed. All are lost peers. The backward must fail:
    # a gradient hook that passed the failed gather on as a success had this rank step on a half-filled
    # buffer and go on to the loss average, where its ring neighbour (on a host that lost another) still
    # waited in the gather for it: the survivors of a killed host waited on each other for
    # dist.peer_timeout_s.
    silent, backward, killed = (ranks[0][k] for k in ("peer_silent", "peer_killed_in_backward", "peer_killed"))
    assert "Timed out waiting" in silent["message"] and silent["lost"], silent
    assert backward["type"] is not None and backward["lost"], backward
    assert killed["lost"], killed


def test_a_dist_error_from_a_bug_exits_1_with_its_traceback_not_75(tmp_path: Path) -> None:
    """The job's entry point (train_ddp.main: config, process group, exit codes) with its run replaced
    by a bug that raises a real DistError (a DistStoreError: an empty store queue) on both ranks: a crash,
    not a lost peer to requeue."""
    proc = subprocess.run(
        _torchrun("job", "wandb.mode=disabled", f"run_dir={tmp_path / 'run'}"),
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "lost contact with another rank" not in out, out[-3000:]
    # Tracebacks (a rank's and torchrun's report), ending in the real error.
    assert out.count("Traceback (most recent call last)") >= 2, out[-3000:]
    assert "QueueEmptyError: queue is empty" in out, out[-3000:]
    # Each rank raises; the first to exit 1 makes torchrun stop the other (-15) if it has not exited yet.
    codes = worker_exit_codes(out)
    assert 1 in codes and set(codes) <= {1, -15}, (codes, out[-3000:])
