"""Claims of the README and docs checked in-process: precision fallback, best.pt, clipping, normalisation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config
from rnnddp.data.mnist import DATASETS
from rnnddp.dist import DistInfo
from rnnddp.tasks import TASKS
from rnnddp.train.precision import Precision, resolve_precision
from tests.conftest import in_process_trainer


def test_fp16_on_a_cpu_runs_in_fp32_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rnnddp"):
        p = resolve_precision("fp16", torch.device("cpu"))
    assert p.name == "fp32" and not p.scaled
    assert "train.precision=fp16 needs a CUDA GPU; running in fp32 on cpu" in caplog.text
    # bf16 is loss-scaled on CUDA only (cuDNN's RNNs run in fp16 there), never on a CPU.
    assert not resolve_precision("bf16", torch.device("cpu")).scaled
    assert (
        resolve_precision("bf16", torch.device("cuda")).scaled
        and resolve_precision("fp16", torch.device("cuda")).scaled
    )


def test_bf16_on_any_cpu_trains_an_lstm_with_the_rest_in_bf16():
    # oneDNN cannot build a bf16 LSTM on CPUs without AVX-512 (a RuntimeError at the first forward); there
    # the recurrent layers run in fp32. The second rule is the fallback itself, forced, so it is checked on
    # every CPU; each autocast is entered on several steps, as the job does.
    cpu = torch.device("cpu")
    for precision in (resolve_precision("bf16", cpu, warn=False), Precision("bf16", cpu, rnn_fp32=True)):
        torch.manual_seed(0)
        lstm, head = torch.nn.LSTM(6, 8, batch_first=True), torch.nn.Linear(8, 3)
        autocast = precision.autocast()
        for _ in range(3):
            with autocast:
                out = head(lstm(torch.randn(4, 5, 6))[0])
            assert out.dtype == torch.bfloat16, precision
            out.float().sum().backward()
        assert torch.backends.mkldnn.enabled  # back on for fp32 runs in the same process
        assert lstm.weight_ih_l0.grad is not None and torch.isfinite(lstm.weight_ih_l0.grad).all()


def test_best_pt_is_a_hard_link_to_its_step_file(tmp_path: Path):
    m = CheckpointManager(tmp_path, keep=1)
    first = m.save({"w": torch.ones(3), "global_step": 1}, 1, best=True)
    assert os.stat(m.dir / "best.pt").st_ino == os.stat(first).st_ino  # one file, two names: no copy
    m.save({"w": torch.zeros(3), "global_step": 2}, 2)  # prunes step 1 (keep=1); best.pt keeps its bytes
    assert not first.exists() and torch.load(m.dir / "best.pt", weights_only=True)["global_step"] == 1


def _update_norm(mnist_root: Path, tmp_path: Path, clip: float) -> float:
    # Plain SGD with lr 1: the update is the (clipped) gradient itself.
    overrides = ["model.hidden_size=8", "optim.name=sgd", "optim.lr=1", "optim.momentum=0", "sched.name=constant"]
    trainer = in_process_trainer(mnist_root, tmp_path, [*overrides, f"train.grad_clip={clip}"])
    before = [p.detach().clone() for p in trainer.module.parameters()]
    trainer.train_step(next(trainer.batches.epoch(0)))
    return (
        torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.module.parameters(), before, strict=True)])
        .norm()
        .item()
    )


def test_grad_clip_bounds_the_update_and_zero_turns_it_off(tmp_path: Path, mnist_root):
    assert abs(_update_norm(mnist_root, tmp_path / "a", 1e-3) - 1e-3) < 1e-5
    assert _update_norm(mnist_root, tmp_path / "b", 0) > 1e-2


def test_normalize_standardises_with_the_data_sets_mean_and_std():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    for dataset, info in DATASETS.items():
        cfg = load_config([f"data.dataset={dataset}", "data.normalize=true"])
        x = TASKS["classify"](cfg, DistInfo()).view(images)
        assert torch.allclose(x, (images.float() / 255 - info.mean) / info.std, atol=1e-6)
    plain = TASKS["classify"](load_config([]), DistInfo()).view(images)
    assert torch.equal(plain, images.float() / 255)
