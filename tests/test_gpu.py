"""CUDA, cuDNN, NCCL and AMP paths (skipped without a GPU; CI has none, run them where one is)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from rnnddp.models import build_model
from rnnddp.trainer import autocast_context
from tests.conftest import final_eval, latest_state, run_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ARGS = dict(cell="lstm", input_size=28, hidden_size=128, num_layers=1, dropout=0.0, bidirectional=False, num_classes=10)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_lstm_takes_the_fused_cudnn_kernel_with_flat_weights():
    model = build_model(ARGS).cuda()
    model.rnn.flatten_parameters()
    x = torch.rand(256, 28, 28, device="cuda")
    with warnings.catch_warnings():
        # cuDNN warns (and copies the weights every call) when they are not one flat chunk.
        warnings.filterwarnings("error", message=".*not part of single contiguous chunk.*")
        ops = _ops(lambda: model(x).sum().backward())
    assert "aten::_cudnn_rnn" in ops, sorted(ops)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_is_finite_and_reports_the_rnn_dtype(precision):
    model = build_model(ARGS).cuda()
    x = torch.rand(64, 28, 28, device="cuda")
    with autocast_context(precision, torch.device("cuda")):
        out, _ = model.rnn(x)
        logits = model(x)
    print(f"precision={precision}: LSTM output dtype {out.dtype}, logits dtype {logits.dtype}")
    assert out.dtype in (torch.float16, torch.bfloat16)
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.zeros(64, dtype=torch.long, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_nccl_job_trains_under_torchrun(tmp_path: Path, mnist_root, precision):
    run = tmp_path / precision
    proc = run_job(
        [
            f"data.root={mnist_root}",
            "dist.backend=nccl",
            f"train.precision={precision}",
            "train.max_steps=300",
            "wandb.mode=disabled",
            f"run_dir={run}",
        ],
        nproc=torch.cuda.device_count(),
    )
    assert "device cuda" in proc.stdout
    assert final_eval(run)["eval/accuracy"] > 0.9
    state = latest_state(run)
    if precision != "fp32":
        # fp16, and bf16 too: cuDNN's RNN runs in fp16 under bf16 autocast, so the scaler is on.
        assert state["scaler"]["scale"] > 0  # the GradScaler ran and its state was saved
