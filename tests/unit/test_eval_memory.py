"""Rank 0 evaluates the sequence tasks' validation and test splits in bounded memory: it reads them batch
by batch from the mapped files and keeps sums, a confusion matrix and the few sequences the pictures
draw, never a per-step array of the whole split; and what it reports is what the whole split gives."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rnnddp import plots
from rnnddp.config import load_config
from rnnddp.data.sequences import SplitArrays, open_prepared, pack, write_prepared
from rnnddp.dist import DistInfo
from rnnddp.tasks import TASKS
from tests.conftest import REPO, job_env

KIND = {"sequence_classification": "label", "step_classification": "per_step", "step_regression": "per_step_value"}
CLASSES = 3


class Elementwise(nn.Module):
    """A stand-in network whose output at a step depends on that step's features alone, by elementwise
    operations: the same bits in any batch, padded or not, as on the split's rows end to end."""

    def __init__(self, outputs: int, per_step: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.5, 1.0, outputs))
        self.v = nn.Parameter(torch.linspace(0.5, -0.7, outputs))
        self.per_step = per_step

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1] * self.w + x[..., 1:2] * self.v

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = self.steps(x)
        return out if self.per_step else out[torch.arange(len(x)), lengths.to(x.device) - 1]  # the last real step


def _split(rng: np.random.Generator, kind: str, n: int, low: int, high: int) -> SplitArrays:
    x = [rng.standard_normal((int(t), 2), dtype=np.float32) for t in rng.integers(low, high, size=n)]
    if kind == "label":
        return pack(x, rng.integers(0, CLASSES, n), None)
    if kind == "per_step":  # mostly the class the network gives, so that many sequences tie at error 0
        steps = [
            np.where(rng.random(len(f)) < 0.9, (f[:, 0] > 0).astype(np.int64), rng.integers(0, CLASSES)) for f in x
        ]
    else:
        steps = [(f[:, :1] * 0.8 + rng.standard_normal((len(f), 1), dtype=np.float32) * 0.1) for f in x]
    return pack(x, None, steps)


def _folder(root: Path, task: str, test: int, low: int, high: int) -> Path:
    rng = np.random.default_rng(5)
    kind = KIND[task]
    splits = {name: _split(rng, kind, n, low, high) for name, n in (("train", 64), ("val", 64), ("test", test))}
    return write_prepared(
        root / task, splits, [f"c{c}" for c in range(CLASSES)] if kind != "per_step_value" else [], {}
    )


def _task(task: str, folder: Path, batch: int) -> tuple[object, nn.Module]:
    cfg = load_config([f"task={task}", f"sequences.path={folder}", "wandb.mode=disabled", f"eval.batch_size={batch}"])
    t = TASKS[task](cfg, DistInfo(device=torch.device("cpu")))
    outputs = 1 if task == "step_regression" else CLASSES
    return t, Elementwise(outputs, per_step=task != "sequence_classification")


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


def measure(task: str, folder: Path, out: Path) -> dict:
    """In a process of its own (memory freed earlier would hide growth): how much the peak resident set grows
    while the test split is evaluated with ``detail`` and its pictures drawn, after a warm-up on validation."""
    t, model = _task(task, folder, batch=16)  # small batches: what they hold is not mistaken for the split's
    splits = t.load()
    plots.preload()

    def evaluate_and_draw(split: SplitArrays, name: str) -> dict:
        result = t.evaluate(model, split, contextlib.nullcontext(), detail=True)
        for picture, draw in t.pictures(result, split).items():
            draw(out / f"{name}_{picture}.png")
        return result

    evaluate_and_draw(splits.val, "warm")  # first calls: torch's and matplotlib's one-time allocations
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    result = evaluate_and_draw(splits.test, "test")
    return {"grew": (_kib("VmHWM") - before) * 1024, "samples": result["samples"]}


@pytest.mark.parametrize("task", list(KIND))
def test_evaluation_holds_no_per_step_array_of_the_whole_split(task: str, tmp_path: Path) -> None:
    # 8M steps (8,000 sequences of 500-1,500 steps, 2 features): the split's features are 64 MB, its per-step
    # targets 64 MB (classes) or 32 MB (values).
    folder = _folder(tmp_path, task, test=8000, low=500, high=1500)
    steps = int(open_prepared(folder).manifest["splits"]["test"]["steps"])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_eval_memory", task, str(folder), str(tmp_path)],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    print(f"{task}: {steps:,} steps evaluated and drawn; peak resident set grew {got['grew'] / 2**20:.1f} MiB")
    assert got["samples"] == (steps if task != "sequence_classification" else 8000)
    # Less than one float32 per step of the split: no per-step array of the whole split was held.
    assert got["grew"] < steps * 4, f"{got['grew'] / 2**20:.0f} MiB"


def _whole_split_reference(t, model: nn.Module, split: SplitArrays, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, confusion or None) computed on the whole split at once, as evaluation did before it streamed."""
    x = torch.from_numpy((np.asarray(split.features) - t.mean) / t.std)
    with torch.no_grad():
        out = model.steps(x)
    if task == "sequence_classification":
        out = out[torch.from_numpy(np.asarray(split.offsets[1:]) - 1)]
        truth = torch.from_numpy(np.array(split.labels, dtype=np.int64))
    elif task == "step_classification":
        truth = torch.from_numpy(np.array(split.targets, dtype=np.int64))
    else:
        return out, None
    predictions = out.softmax(dim=1).max(dim=1).indices
    confusion = torch.bincount(truth * CLASSES + predictions, minlength=CLASSES * CLASSES).view(CLASSES, CLASSES)
    return predictions, confusion


def _chosen(split: SplitArrays, predictions: torch.Tensor, names: list[str]) -> list[tuple]:
    """The picture's sequences chosen from the whole split's predictions: the 2 worst, then the first others."""
    offsets, truth = np.asarray(split.offsets), torch.from_numpy(np.array(split.targets))
    if names:
        err = (predictions != truth).double()
    else:
        err = ((predictions - truth) ** 2).reshape(len(truth), -1).mean(dim=1).double()
    per_seq = np.add.reduceat(err.numpy(), offsets[:-1]) / np.diff(offsets)
    worst = np.argsort(-per_seq, kind="stable")[:2].tolist()
    chosen = worst + [i for i in range(len(offsets) - 1) if i not in worst][: 4 - len(worst)]
    rows = [(int(offsets[i]), int(offsets[i + 1])) for i in chosen]
    return [
        (i, np.asarray(split.features[a:b]), truth[a:b].numpy(), predictions[a:b].numpy(), float(per_seq[i]))
        for i, (a, b) in zip(chosen, rows, strict=True)
    ]


@pytest.mark.parametrize("task", list(KIND))
def test_streamed_evaluation_reports_and_draws_what_the_whole_split_gives(task: str, tmp_path: Path) -> None:
    folder = _folder(tmp_path, task, test=300, low=1, high=40)
    t, model = _task(task, folder, batch=7)  # many batches, each of sequences far apart in the split
    test = t.load().test
    autocast = contextlib.nullcontext()
    result = t.evaluate(model, test, autocast, detail=True)
    plain = t.evaluate(model, test, autocast)
    assert {k: result[k] for k in plain} == plain  # the detail changes no figure
    predictions, confusion = _whole_split_reference(t, model, test, task)
    names = t.data.class_names
    if confusion is not None:
        assert torch.equal(result["confusion"], confusion)
        assert result[t.metric.name] == pytest.approx(
            confusion.diagonal().sum().item() / confusion.sum().item(), abs=1e-12
        )
    else:
        truth = torch.from_numpy(np.array(test.targets))
        assert result["mse"] == pytest.approx(float(((predictions.double() - truth) ** 2).mean()), rel=1e-6)
    # The pictures: the same sequences, titles and values as drawn from the whole split's predictions.
    drawn = t.pictures(result, test)["test_sequences"](tmp_path / "streamed.png")
    if task == "sequence_classification":
        whole = plots.sequence_examples(test, predictions, names, tmp_path / "whole.png")
    else:
        whole = plots.step_examples(_chosen(test, predictions, names), tmp_path / "whole.png", names=names or None)
    assert drawn.read_bytes() == whole.read_bytes()


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
