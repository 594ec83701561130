"""Reproduce docs/results.md: train each config to the end and report the final model's test metric.

    python -m bench.results --root ../shared/data --nproc 2 seed_lstm seed_gru ...

Each config in configs/ runs as the job itself (torchrun with --nproc ranks, or plain python
for 1) in a fresh run directory, W&B off. Printed per config: model, view, epochs, the final
model's test accuracy (or MSE for the sine task) and the best validation result from
metrics.jsonl, and the wall time from launch to exit. The rows also go to bench_results/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rnnddp.config import load_config
from rnnddp.launch import job_command, job_env
from rnnddp.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = [
    "default",
    "seed_lstm",
    "seed_lstm2",
    "seed_bilstm",
    "seed_gru",
    "seed_rnn",
    "seed_cnn",
    "seed_sine",
]


def describe(cfg: Any) -> tuple[str, str]:
    """(model, view) as the table shows them."""
    m = cfg.model
    if cfg.task == "sine_regression":
        return f"{m.cell.upper()}-{m.hidden_size}, per-step regression", f"sin->cos, chunks of {cfg.sine.chunk_len}"
    if m.name == "cnn":
        return "CNN (2 conv + linear)", cfg.data.view
    layers = f"{m.num_layers}-layer " if m.num_layers > 1 else ""
    return f"{'bidirectional ' if m.bidirectional else ''}{layers}{m.cell.upper()}-{m.hidden_size}", cfg.data.view


def run_config(name: str, root: str, nproc: int, extra: list[str], tmp: Path) -> dict[str, Any]:
    config = REPO / "configs" / f"{name}.yaml"
    run_dir = tmp / name
    args = ["--config", str(config), f"data.root={root}", f"run_dir={run_dir}", "resume=none", "wandb.mode=disabled"]
    args += extra
    cfg = load_config(args)
    # torchrun gives each rank OMP_NUM_THREADS=1 unless it is set, as for a user's launch.
    env = job_env(threads=None)
    start = time.perf_counter()
    proc = subprocess.run(job_command(args, nproc), env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    model, view = describe(cfg)
    row: dict[str, Any] = {
        "config": name,
        "model": model,
        "view": view,
        "epochs": cfg.train.epochs,
        "nproc": nproc,
        "wall_s": round(wall, 1),
        "returncode": proc.returncode,
        "command": f"{'torchrun --nproc_per_node=' + str(nproc) if nproc > 1 else 'python'} train_ddp.py "
        f"--config configs/{name}.yaml data.root={root}" + "".join(f" {e}" for e in extra),
    }
    metric = TASKS[cfg.task].metric.name
    tests, vals = [], []
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        tests = [r for r in records if f"test/{metric}" in r]
        vals = [r for r in records if f"val/best_{metric}" in r]
    if proc.returncode != 0 or not tests:
        row["error"] = (proc.stdout + proc.stderr)[-1500:]
    else:
        row[metric] = tests[-1][f"test/{metric}"]
        row[f"best_val_{metric}"] = vals[-1][f"val/best_{metric}"] if vals else None
    return row


def fmt(row: dict[str, Any]) -> str:
    if "error" in row:
        result = f"failed (exit {row['returncode']})"
    elif "mse" in row:
        result = f"MSE {row['mse']:.4f} (best val {row['best_val_mse']:.4f})"
    else:
        result = f"{100 * row['accuracy']:.2f}% (best val {100 * row['best_val_accuracy']:.2f}%)"
    return f"| `{row['config']}.yaml` | {row['model']} | {row['view']} | {row['epochs']} | {result} | {row['wall_s']:.0f} s |"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS, help="names under configs/ (default: %(default)s)")
    p.add_argument("--root", default="data", help="data.root: the folder holding MNIST/raw")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun); 1 runs plain python")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--out", default="bench_results/results.json")
    a = p.parse_args(argv)
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"{os.cpu_count()}-core {platform.machine()} CPU"
    )
    print(f"# {device}, torch {torch.__version__}, {a.nproc} rank(s), {time.strftime('%Y-%m-%d')}")
    print("| config | model | view | epochs | final model on test (best validation) | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rnnddp-results-") as tmp:
        for name in a.configs:
            row = run_config(name, a.root, a.nproc, a.set, Path(tmp))
            rows.append(row)
            print(fmt(row), flush=True)
            if "error" in row:
                print(row["error"], file=sys.stderr)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
