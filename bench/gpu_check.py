"""One GPU session's worth of checks and timings: run on a CUDA machine, read what it prints.

    python -m bench.gpu_check --out bench_results/gpu_check.json

Reports: versions and card; whether the LSTM takes cuDNN's fused kernel; which dtype the LSTM
really runs in under bf16/fp16 autocast; training-step throughput for each precision (rows
and pixel MNIST); and epoch times (the job's own step, with and without train.cuda_graph, is timed by
bench.throughput). Figures only, no asserts: the tests assert behaviour.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rnnddp.models import build_model
from rnnddp.train.precision import Precision


def _args(hidden: int, input_size: int = 28) -> dict:
    return dict(
        cell="lstm",
        input_size=input_size,
        hidden_size=hidden,
        num_layers=1,
        dropout=0.0,
        bidirectional=False,
        num_classes=10,
    )


def rnn_dtypes() -> dict[str, str]:
    """The dtype cuDNN's LSTM outputs under each autocast mode (aten's AutocastRNN may pick fp16)."""
    model = build_model(_args(128)).cuda()
    x = torch.rand(8, 28, 28, device="cuda")
    out = {}
    for p in ("bf16", "fp16"):
        with Precision(p, torch.device("cuda")).autocast():
            y, _ = model.rnn(x)
        out[p] = str(y.dtype)
    # A bf16 module without autocast: does cuDNN take bf16 weights at all?
    try:
        m = build_model(_args(128)).cuda().bfloat16()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = m(x.bfloat16())
            y.float().sum().backward()
        out["bf16_module"] = str(y.dtype)
        out["bf16_module_cudnn"] = str(any(e.key == "aten::_cudnn_rnn" for e in prof.key_averages()))
    except Exception as e:  # report, do not stop the other checks
        out["bf16_module"] = f"error: {str(e).splitlines()[0][:200]}"
    return out


def step_throughput(
    precision: str, hidden: int, batch: int, steps: int, pixels: bool = False, tf32: bool = True
) -> dict:
    """Optimiser steps per second on pre-made device batches (the model's own speed)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    seq, feat = (784, 1) if pixels else (28, 28)
    model = build_model(_args(hidden, feat)).cuda()
    model.rnn.flatten_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    rule = Precision(precision, torch.device("cuda"))  # the job's rule: bf16 on CUDA is loss-scaled too
    scaler, ctx = rule.grad_scaler(), rule.autocast()
    xs = torch.rand(8, batch, seq, feat, device="cuda")
    ys = torch.randint(0, 10, (8, batch), device="cuda")

    def run(n: int) -> None:
        for i in range(n):
            with ctx:
                logits = model(xs[i % 8])
            loss = F.cross_entropy(logits.float(), ys[i % 8])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    run(10)
    torch.cuda.synchronize()
    t = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    sps = steps / dt
    return {"steps_per_s": round(sps, 1), "samples_per_s": round(sps * batch), "epoch_s": round(60000 / batch / sps, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_results/gpu_check.json")
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU visible; run this on a GPU machine")
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(),
        "python": platform.python_version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    }
    print(json.dumps(report))
    report["rnn_dtype_under_autocast"] = rnn_dtypes()
    print("rnn dtypes:", report["rnn_dtype_under_autocast"], flush=True)
    table = {}
    for name, kw in {
        "rows_h128_b256_fp32_notf32": dict(precision="fp32", hidden=128, batch=256, tf32=False),
        "rows_h128_b256_fp32_tf32": dict(precision="fp32", hidden=128, batch=256),
        "rows_h128_b256_bf16": dict(precision="bf16", hidden=128, batch=256),
        "rows_h128_b256_fp16": dict(precision="fp16", hidden=128, batch=256),
        "rows_h64_b64_fp32": dict(precision="fp32", hidden=64, batch=64),
        "pixels_h128_b256_bf16": dict(precision="bf16", hidden=128, batch=256, pixels=True),
        "pixels_h128_b256_fp32": dict(precision="fp32", hidden=128, batch=256, pixels=True),
    }.items():
        steps = a.steps // 4 if "pixels" in name else a.steps
        table[name] = step_throughput(steps=steps, **kw)
        print(f"{name:32s} {table[name]}", flush=True)
    report["model_only"] = table
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
