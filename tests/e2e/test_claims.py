"""Claims of the README checked with real processes: threads per rank, the API key, evaluate's precision."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, final_eval, job_cmd, job_env, run_job

SHORT = ["model.hidden_size=16", "train.global_batch_size=64", "train.max_steps=20", "eval.batch_size=2000"]


def test_each_torchrun_rank_gets_one_thread_unless_told_otherwise(tmp_path: Path):
    """The thread count the job itself reports (rank 0's ``training ...`` line: torch.get_num_threads()
    once the trainer is built) for a 2-rank torchrun launch: 1 with OMP_NUM_THREADS unset in the job's
    environment, the number given when set (2: torch caps OMP_NUM_THREADS at the CPUs there are, and
    CI has 2; a job that set its own count, 1 or the CPUs, fails one case or the other)."""
    # The job's environment, controlled here: none of the test process's thread settings leak in
    # (job_env() passes on the test process's OMP_NUM_THREADS, else sets 1, for the other tests).
    unset = {k: v for k, v in job_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    tiny = ["task=sine_regression", "sine.sequences=16", "sine.val_sequences=8", "sine.test_sequences=8"]
    tiny += ["sine.length=10", "model.hidden_size=8", "train.global_batch_size=8", "train.max_steps=2"]
    cases = {"unset": (unset, 1), "told": ({**unset, "OMP_NUM_THREADS": "2"}, 2)}
    # Both launches at once: each is mostly three processes importing torch, on one core at a time.
    cmds: dict[str, list[str]] = {}
    while len({a for c in cmds.values() for a in c if a.startswith("--master_port=")}) < len(cases):
        cmds = {name: job_cmd([*tiny, "wandb.mode=disabled", f"run_dir={tmp_path / name}"], nproc=2) for name in cases}
    procs = {
        name: subprocess.Popen(
            cmds[name],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (env, _) in cases.items()
    }
    try:
        out = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for name, (_, threads) in cases.items():
        assert procs[name].returncode == 0, (name, out[name][-3000:])
        line = re.findall(
            r"INFO training .* over (\d+) rank\(s\)\), .*?, (\d+) CPU thread\(s\), backend gloo", out[name]
        )
        assert line == [("2", str(threads))], (name, out[name][-3000:])


def test_the_wandb_api_key_is_never_written_or_printed(tmp_path: Path, mnist_root):
    key = "0123456789abcdef0123456789abcdef01234567"  # the shape of a real key, valid nowhere
    run = tmp_path / "run"
    env = {**job_env(), "WANDB_API_KEY": key}
    args = [*SHORT, "wandb.mode=offline", f"data.root={mnist_root}", f"run_dir={run}"]
    proc = subprocess.run(job_cmd(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert key not in proc.stdout + proc.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    leaked = [p for p in files if key.encode() in p.read_bytes()]
    assert leaked == [], leaked


def test_evaluate_uses_the_precision_the_run_trained_in(tmp_path: Path, mnist_root):
    run = tmp_path / "run"
    run_job([*SHORT, "train.precision=bf16", "wandb.mode=disabled", f"data.root={mnist_root}", f"run_dir={run}"])
    logged = final_eval(run)["test/accuracy"]
    cli = subprocess.run(
        [sys.executable, "-m", "rnnddp.evaluate", str(run), "--no-plots"],
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert "; bf16)" in cli.stdout.splitlines()[0] and f"accuracy {logged:.4f}  (10000 images)" in cli.stdout, (
        cli.stdout
    )
    assert os.environ.get("ACCELERATE_MIXED_PRECISION") is None  # nothing outside the checkpoint chose bf16


def test_wandb_online_without_a_server_falls_back_to_offline_and_loses_nothing(tmp_path: Path, mnist_root):
    from rnnddp.wandb_files import history, offline_runs

    run = tmp_path / "run"
    # A key (so auto means online) and a server address where nothing listens.
    env = {k: v for k, v in job_env().items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567", WANDB_BASE_URL="http://127.0.0.1:9")
    args = [*SHORT, "train.log_every_steps=5", "wandb.mode=auto", "wandb.init_timeout_s=3", f"data.root={mnist_root}"]
    proc = subprocess.run(
        job_cmd([*args, f"run_dir={run}"]), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "wandb online init failed" in proc.stdout and "logging offline instead" in proc.stdout
    # W&B's service process may still be writing the offline file when the job has exited (seen on a
    # loaded machine): wait for it, a bounded while.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        len(offline_runs(run)) == 1 and [int(r["_step"]) for r in history(offline_runs(run)[0])] == [5, 10, 15, 20]
    ):
        time.sleep(0.5)
    files = offline_runs(run)
    assert len(files) == 1, files
    # Everything logged while W&B was still trying the server reached the offline run, in order.
    assert [int(r["_step"]) for r in history(files[0])] == [5, 10, 15, 20]
