"""Batch-1 serving latency: an exported model in onnxruntime against eager PyTorch, both on the CPU.

    python -m bench.export_latency                  # about a minute on 2 idle CPU cores
    python -m bench.export_latency --threads 2 --repeat 300

Two models, each a checkpoint of the job's own network (initial weights; latency does not depend
on them) exported with rnnddp-export (rnnddp.export.write.export_model) into a temporary folder:

  sequence   task=sequence_classification, a bidirectional LSTM 2 x 64 over 12 features (the
             JapaneseVowels shape), one sequence of 25 steps per call: milliseconds per sequence
  token      task=language_model, a character LSTM 2 x 256 (embedding 64, vocabulary 65): after a
             20-character prompt, one token in and the state carried per call, as generation runs:
             milliseconds per generated token

eager is the restored network in eval mode under torch.inference_mode(); onnxruntime runs the
exported file with the CPU provider. Both use ``--threads`` intra-op threads. Printed: the median
of ``--repeat`` calls after warm-up, and the ratio eager / onnxruntime (above 1: onnxruntime is
faster). The rows also go to bench_results/export.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from rnnddp import checkpoint
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config, to_dict
from rnnddp.dist import DistInfo
from rnnddp.evaluate import restore
from rnnddp.export.write import export_model
from rnnddp.models import initial_model
from rnnddp.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(max(10, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def save_run(run: Path, overrides: list[str]) -> Path:
    cfg = load_config(["wandb.mode=disabled", *overrides])
    task = TASKS[cfg.task](cfg, DistInfo(device=torch.device("cpu")))
    args = task.model_args()
    state = {"format": checkpoint.FORMAT, "model": initial_model(args, 0).state_dict(), "model_args": args}
    CheckpointManager(run).save({**state, "config": to_dict(cfg), "global_step": 0, **task.state_dict()}, 0)
    return run


def sequences_folder(root: Path) -> Path:
    """A prepared folder of random 12-feature sequences of 7-29 steps, 9 classes (only the shape matters here)."""
    from rnnddp.prepare import prepare

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        x = np.empty(45, dtype=object)
        for i in range(45):
            x[i] = rng.standard_normal((int(rng.integers(7, 30)), 12)).astype(np.float32)
        np.savez(root / f"{split}.npz", x=x, y=np.array([str(k % 9) for k in range(45)]))
    return prepare(root / "train.npz", root / "test.npz", root / "seq")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=200)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")  # the exporter's notes on tracing
    torch.set_num_threads(a.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = a.threads
    rows = []
    with tempfile.TemporaryDirectory(prefix="rnnddp-export-bench-") as tmp:
        root = Path(tmp)
        from rnnddp.data.text import prepare_text

        text = root / "text.txt"
        text.write_text((REPO / "README.md").read_text() * 3)
        prepare_text(text, root / "chars", "char")
        runs = {
            "sequence": save_run(
                root / "seq_run",
                [
                    "task=sequence_classification",
                    f"sequences.path={sequences_folder(root)}",
                    "model.bidirectional=true",
                    "model.num_layers=2",
                    "model.hidden_size=64",
                ],  # fmt: skip
            ),
            "token": save_run(
                root / "lm_run",
                [
                    "task=language_model",
                    f"lm.path={root / 'chars'}",
                    "model.hidden_size=256",
                    "lm.emb_size=64",
                    "model.num_layers=2",
                    "lm.tie_weights=false",
                ],  # fmt: skip
            ),
        }
        for name, run in runs.items():
            export_model(run, "onnx", root / f"{name}_onnx")
            session = onnxruntime.InferenceSession(
                str(root / f"{name}_onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            net = restore(run, []).module
            if name == "sequence":
                x = torch.randn(1, 25, 12)
                n = torch.tensor([25])
                feed = {"x": x.numpy(), "lengths": n.numpy()}

                def eager(x: torch.Tensor = x, n: torch.Tensor = n, net: torch.nn.Module = net) -> object:
                    with torch.inference_mode():
                        return net(x, n)
            else:
                with torch.inference_mode():
                    _, state = net(torch.randint(0, 60, (1, 20)))
                token = torch.tensor([[5]])
                info = json.loads((root / f"{name}_onnx" / "serving.json").read_text())
                flat = [t.numpy() for s in state for t in (s if isinstance(s, tuple) else (s,))]
                feed = {"tokens": token.numpy(), **{s["input"]: v for s, v in zip(info["state"], flat, strict=True)}}

                def eager(token: torch.Tensor = token, state: list = state, net: torch.nn.Module = net) -> object:
                    with torch.inference_mode():
                        return net(token, state)

            def served(feed: dict = feed, session: onnxruntime.InferenceSession = session) -> object:
                return session.run(None, feed)

            ms_eager, ms_onnx = median_ms(eager, a.repeat), median_ms(served, a.repeat)
            rows.append({"model": name, "threads": a.threads, "eager_ms": ms_eager, "onnxruntime_ms": ms_onnx})
    what = {"sequence": "per sequence (25 steps)", "token": "per generated token"}
    print(f"batch 1, {a.threads} thread(s), median of {a.repeat} calls (ms):")
    print(f"  {'model':28s} {'eager torch':>12s} {'onnxruntime':>12s} {'eager/ort':>10s}")
    for r in rows:
        ratio = r["eager_ms"] / r["onnxruntime_ms"]
        print(f"  {what[r['model']]:28s} {r['eager_ms']:12.3f} {r['onnxruntime_ms']:12.3f} {ratio:9.2f}x")
    out = REPO / "bench_results"
    out.mkdir(exist_ok=True)
    with (out / "export.json").open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
