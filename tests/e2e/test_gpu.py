"""CUDA, cuDNN, NCCL and AMP paths (skipped without a GPU; CI has none, run them where one is)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from rnnddp.models import build_model
from rnnddp.train.cuda_graph import GraphedStep
from rnnddp.train.precision import Precision
from tests.conftest import final_eval, in_process_trainer, latest_state, run_job

pytestmark = [pytest.mark.gpu]


@pytest.fixture(autouse=True)
def _cuda() -> None:
    """Skip without a GPU; with RNNDDP_REQUIRE_GPU=1 (bench/gpu_session.sh sets it) fail instead."""
    if not torch.cuda.is_available():
        if os.environ.get("RNNDDP_REQUIRE_GPU") == "1":
            pytest.fail("RNNDDP_REQUIRE_GPU=1 but no CUDA GPU is visible")
        pytest.skip("needs a CUDA GPU (set RNNDDP_REQUIRE_GPU=1 to make this a failure)")


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
    with Precision(precision, torch.device("cuda")).autocast():
        out, _ = model.rnn(x)
        logits = model(x)
    print(f"precision={precision}: LSTM output dtype {out.dtype}, logits dtype {logits.dtype}")
    # The finding the bf16 GradScaler rests on: aten's AutocastRNN runs cuDNN's LSTM in fp16 under bf16 too.
    assert out.dtype == torch.float16
    assert Precision(precision, torch.device("cuda")).scaled
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
        launcher=["--nnodes=1"],  # torchrun even on one GPU: a process group, NCCL
    )
    assert "device cuda" in proc.stdout and "backend nccl" in proc.stdout, proc.stdout[-2000:]
    assert final_eval(run)["test/accuracy"] > 0.9
    state = latest_state(run)
    if precision != "fp32":
        # fp16, and bf16 too: cuDNN's RNN runs in fp16 under bf16 autocast, so the scaler is on.
        assert state["scaler"]["scale"] > 0  # the GradScaler ran and its state was saved


@pytest.mark.parametrize(
    ("precision", "model"),
    [
        ("fp32", []),
        ("bf16", []),
        ("bf16", ["model.cell=gru"]),
        ("bf16", ["model.num_layers=2", "model.bidirectional=true"]),
        ("fp16", ["model.name=cnn"]),
    ],
    ids=["lstm-fp32", "lstm-bf16", "gru-bf16", "bilstm2-bf16", "cnn-fp16"],
)
def test_cuda_graph_steps_match_eager_steps(tmp_path: Path, mnist_root, precision, model):
    """The graphed step must train exactly like the eager one: same batches, same weights after.

    Stale inputs (a replay reading the capture batch), a stale LR, clipping or loss scaling left
    out of the graph, or a graph that does not run at all each make the losses or weights differ.
    """
    common = [
        f"train.precision={precision}",
        "train.global_batch_size=256",
        "model.hidden_size=128",
        "train.max_steps=40",  # the one-cycle LR changes at every step: a stale LR in the graph shows
        *model,
    ]
    eager = in_process_trainer(mnist_root, tmp_path / "eager", common, "cuda")
    graphed = in_process_trainer(mnist_root, tmp_path / "graph", [*common, "train.cuda_graph=true"], "cuda")
    assert isinstance(graphed.step, GraphedStep) and not isinstance(eager.step, GraphedStep)
    losses = {"eager": [], "graph": []}
    for name, trainer in (("eager", eager), ("graph", graphed)):
        for _, batch in zip(range(40), trainer.batches.epoch(0), strict=False):
            losses[name].append(trainer.train_step(batch).item())
    assert graphed.step.graph is not None
    assert losses["graph"][-1] < losses["graph"][0] * 0.8  # it learns
    torch.testing.assert_close(torch.tensor(losses["graph"]), torch.tensor(losses["eager"]), rtol=2e-3, atol=2e-3)
    for (name, a), b in zip(eager.module.named_parameters(), graphed.module.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
    # Evaluation runs the module's ordinary forward (eval mode) and agrees between the two.
    acc = [t.validate(t.module)["accuracy"] for t in (eager, graphed)]
    assert abs(acc[0] - acc[1]) < 0.01, acc


def test_cuda_graph_job_trains_saves_and_resumes(tmp_path: Path, mnist_root):
    run = tmp_path / "graph"
    args = [f"data.root={mnist_root}", "train.cuda_graph=true", "wandb.mode=disabled", f"run_dir={run}"]
    first = run_job([*args, "train.max_steps=300", "checkpoint.every_steps=150"])
    assert "captured the training step" in first.stdout
    assert final_eval(run)["test/accuracy"] > 0.9
    # Resume from the step-150 checkpoint into a new run: the graph is captured after the load.
    again = run_job(
        [
            *args[:-1],
            f"run_dir={tmp_path / 'resumed'}",
            f"resume={run}/checkpoints/step_0000150.pt",
            "train.max_steps=300",
        ]
    )
    assert "captured" in again.stdout and "resuming from" in again.stdout
    assert final_eval(tmp_path / "resumed")["test/accuracy"] > 0.9
    # The resumed run continued the optimiser (not a fresh one from step 150) and ends near where the
    # uninterrupted run ended (two processes: cuDNN may pick other kernels, hence a looser tolerance).
    whole, resumed = latest_state(run), latest_state(tmp_path / "resumed")
    assert all(int(s["step"]) == 300 for s in resumed["optimizer"]["state"].values())
    for k, v in whole["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-2, atol=2e-3, msg=lambda m, k=k: f"{k}: {m}")


def test_the_training_set_lives_in_gpu_memory(tmp_path: Path, mnist_root):
    trainer = in_process_trainer(mnist_root, tmp_path, ["model.hidden_size=16"], "cuda")
    assert trainer.batches.split.inputs.device.type == "cuda"  # data.device_resident=auto
    cpu_resident = in_process_trainer(
        mnist_root, tmp_path / "b", ["model.hidden_size=16", "data.device_resident=false"], "cuda"
    )
    assert cpu_resident.batches.split.inputs.device.type == "cpu"
    x, y = next(cpu_resident.batches.epoch(0))
    assert x.device.type == "cuda" and y.device.type == "cuda"


def test_fp16_grad_scaler_skips_non_finite_steps(tmp_path: Path, mnist_root):
    # From step 5 on every loss is NaN: the scaler must skip those updates (and lower its scale), not apply them.
    trainer = in_process_trainer(
        mnist_root, tmp_path, ["train.precision=fp16", "debug.nonfinite_from_step=5", "train.max_steps=10"], "cuda"
    )
    assert trainer.scaler.is_enabled()
    batches = trainer.batches.epoch(0)
    for _ in range(4):
        assert torch.isfinite(trainer.train_step(next(batches)))
        trainer.global_step += 1
    before = [p.detach().clone() for p in trainer.module.parameters()]
    scale = trainer.scaler.get_scale()
    for _ in range(6):
        assert not torch.isfinite(trainer.train_step(next(batches)))
        trainer.global_step += 1
    assert all(torch.equal(p, b) for p, b in zip(trainer.module.parameters(), before, strict=True))
    assert trainer.scaler.get_scale() < scale


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_language_model_trains_on_cudnn_and_resumes_its_carried_state_exactly(tmp_path: Path, precision: str):
    """task=language_model on the GPU: cuDNN's fused LSTM per layer, the stripes read on the device, the carried
    state kept in fp32 under autocast; a stop-and-resume ends bit for bit equal to the uninterrupted run."""
    from rnnddp import prepare

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(600)))
    assert prepare.main(["--text", str(text), "--tokenizer", "char", "--out", str(tmp_path / "data")]) == 0
    args = ["task=language_model", f"lm.path={tmp_path / 'data'}", "lm.bptt=32", "model.hidden_size=64",
            "train.global_batch_size=16", "train.max_steps=40", "checkpoint.every_steps=10",
            f"train.precision={precision}", "wandb.mode=disabled"]  # fmt: skip
    run_job([*args, f"run_dir={tmp_path / 'whole'}"])
    run_job([*args, f"run_dir={tmp_path / 'cut'}", "debug.stop_at_step=17"], check=False)
    run_job([*args, f"run_dir={tmp_path / 'cut'}"])
    whole, cut = latest_state(tmp_path / "whole"), latest_state(tmp_path / "cut")
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert cut["carry"][0][0].dtype == torch.float32
    assert final_eval(tmp_path / "whole", "bpc")["test/bpc"] < 4.0
