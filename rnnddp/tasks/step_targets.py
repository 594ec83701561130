"""Per-step targets on a folder ``rnnddp-prepare`` made: a class at every step (step_classification)
or values at every step (step_regression); the loss counts each sequence's real steps only.

Normalisation: a rank's loss is its steps' summed loss over the real steps of the whole global
batch (``PaddedBatch.global_steps``, the same on every rank) times the world size. DDP averages
the ranks' gradients, so the gradient is that of the mean over all the global batch's real
steps: the same on 1 or N ranks, however the steps fall among the ranks' shares.

Evaluation streams: the split is read batch by batch and only sums are kept (and, for the final
test, a confusion matrix and the few sequences the picture draws, :class:`StepExamples`), never a
per-step array of the whole split, which may be larger than memory as the training split may.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnddp import plots
from rnnddp.data.sequences import IGNORE, PaddedBatch, SplitArrays
from rnnddp.metrics import Metric
from rnnddp.models import tagger_args
from rnnddp.tasks.base import Picture, per_class_report
from rnnddp.tasks.prepared import PreparedSequences


def real_steps(batch: PaddedBatch) -> torch.Tensor:
    """[b, T] bool: True at each sequence's real steps."""
    steps = torch.arange(batch.x.shape[1], device=batch.x.device)
    return steps[None, :] < batch.lengths.to(batch.x.device)[:, None]


class StepExamples:
    """The sequences ``plots.step_examples`` draws, chosen while a split streams past in batches.

    It draws the ``n // 2`` sequences of the largest mean error per step (the first by index on a
    tie), then the first others. Kept: every sequence's mean error (one number each, as the
    offsets are) and the per-step targets and predictions of the candidates so far (the ``n // 2``
    worst seen, and sequences ``0..n-1``), not the split's per-step predictions.
    """

    def __init__(self, split: SplitArrays, n: int = 4) -> None:
        self.split, self.n = split, n
        self.errors = np.zeros(len(split))
        self.worst: list[tuple[float, int]] = []  # (rank key, index) of the n // 2 worst so far
        self.kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # index -> (targets, predictions) per step

    @staticmethod
    def _key(error: float, i: int) -> tuple[float, int]:
        """The order of ``np.argsort(-errors, kind="stable")``: the largest first, NaN last, ties by index."""
        return (-error if not math.isnan(error) else math.inf, i)

    def add(self, index: np.ndarray, batch: PaddedBatch, predictions: torch.Tensor) -> None:
        """Sequences ``index`` of a batch: ``predictions`` per step, [b, T] classes or [b, T, K] values (CPU)."""
        y, lengths = batch.y.cpu(), batch.lengths.numpy()
        if predictions.dtype.is_floating_point:  # as step_examples: squared error, the mean over the K values
            per_step = ((predictions - y) ** 2).reshape(*y.shape[:2], -1).mean(dim=2).double()
        else:
            per_step = (predictions != y).double()
        flat = np.concatenate([per_step[row, :n].numpy() for row, n in enumerate(lengths)])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.errors[index] = np.add.reduceat(flat, starts) / lengths  # each sequence's sum, as step_examples adds it
        self.worst = sorted(self.worst + [self._key(self.errors[i], i) for i in index.tolist()])[: self.n // 2]
        wanted = {i for _, i in self.worst}
        self.kept = {i: v for i, v in self.kept.items() if i in wanted or i < self.n}
        for row, i in enumerate(index.tolist()):
            if i in wanted or i < self.n:
                n = lengths[row]  # copies: a view would hold the whole batch
                self.kept[i] = (y[row, :n].numpy().copy(), predictions[row, :n].numpy().copy())

    def chosen(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, float]]:
        """What ``plots.step_examples`` draws: (index, features, targets, predictions, error) of the worst
        ``n // 2`` sequences, then the first others."""
        worst = np.argsort(-self.errors, kind="stable")[: self.n // 2].tolist()
        chosen = worst + [i for i in range(min(self.n, len(self.errors))) if i not in worst][: self.n - len(worst)]
        return [(i, self.split.read_sequence(i), *self.kept[i], float(self.errors[i])) for i in chosen]


class StepTargets(PreparedSequences):
    """The shared evaluation loop: sums over every real step, batch by batch."""

    def step_sums(self, output: torch.Tensor, batch: PaddedBatch) -> dict[str, float]:
        """This batch's summed per-step figures (loss, and the task's own)."""
        raise NotImplementedError

    def step_predictions(self, output: torch.Tensor) -> torch.Tensor:
        """What the picture draws at each step: [b, T] classes or [b, T, K] values."""
        raise NotImplementedError

    def detail_sums(self, predictions: torch.Tensor, batch: PaddedBatch) -> dict[str, Any]:
        """This batch's share of what the final test adds (a confusion matrix), from ``step_predictions`` (CPU)."""
        return {}

    @torch.no_grad()
    def run_split(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool
    ) -> tuple[dict[str, Any], StepExamples | None]:
        """Summed figures over every real step; with ``detail``, ``detail_sums`` too and the drawn sequences."""
        was_training = module.training
        module.eval()
        sums: dict[str, Any] = {}
        examples = StepExamples(split) if detail else None
        for index, batch in self.eval_batches(split):
            with autocast:
                out = module(batch.x, batch.lengths).float()
            figures = self.step_sums(out, batch)
            if examples is not None:
                predictions = self.step_predictions(out).cpu()
                examples.add(index, batch, predictions)
                figures.update(self.detail_sums(predictions, batch))
            for k, v in figures.items():
                sums[k] = sums.get(k, 0) + v
        module.train(was_training)
        return sums, examples

    def pictures(self, result: dict[str, Any], split: SplitArrays) -> dict[str, Picture]:
        names = self.data.class_names or None
        examples: StepExamples = result["examples"]

        def draw(out: Path) -> Path:
            return plots.step_examples(examples.chosen(), out, names=names)

        return {"test_sequences": draw}


class StepClassification(StepTargets):
    name = "step_classification"
    target_kind = "per_step"
    metric = Metric("accuracy", higher_is_better=True)

    def model_args(self) -> dict:
        return tagger_args(self.cfg.model, self.data.feature_count, len(self.data.class_names))

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        with autocast:
            logits = model(batch.x, batch.lengths)
        total = F.cross_entropy(logits.float().flatten(0, 1), batch.y.flatten(), ignore_index=IGNORE, reduction="sum")
        return total * (self.info.world_size / batch.global_steps)

    def step_sums(self, output: torch.Tensor, batch: PaddedBatch) -> dict[str, float]:
        y = batch.y.flatten()
        logits = output.flatten(0, 1)
        real = y != IGNORE
        return {
            "loss": F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum").item(),
            "correct": float(((logits.argmax(dim=1) == y) & real).sum()),
            "steps": float(real.sum()),
        }

    def step_predictions(self, output: torch.Tensor) -> torch.Tensor:
        return output.softmax(dim=-1).max(dim=-1).indices

    def detail_sums(self, predictions: torch.Tensor, batch: PaddedBatch) -> dict[str, Any]:
        classes = len(self.data.class_names)
        y = batch.y.cpu()
        cells = torch.where(y != IGNORE, y * classes + predictions, classes * classes)  # padding: one more cell
        return {"confusion": torch.bincount(cells.flatten(), minlength=classes * classes + 1)[:-1]}

    def evaluate(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean cross-entropy and accuracy over every real step of every sequence."""
        sums, examples = self.run_split(module, split, autocast, detail=detail)
        n = sums["steps"]
        result: dict[str, Any] = {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "samples": int(n)}
        if detail:
            classes = len(self.data.class_names)
            result["confusion"], result["examples"] = sums["confusion"].view(classes, classes), examples
        return result

    def pictures(self, result: dict[str, Any], split: SplitArrays) -> dict[str, Picture]:
        conf, names = result["confusion"], self.data.class_names
        return {
            "confusion_matrix": lambda out: plots.confusion_matrix(conf, out, names=names),
            **super().pictures(result, split),
        }

    def report(self, result: dict[str, Any], split: SplitArrays) -> list[str]:
        return per_class_report(result, self.data.class_names, "steps")

    def predict_lines(self, file: str, output: torch.Tensor) -> list[str]:
        p = output.softmax(dim=1).max(dim=1)
        names = self.data.class_names
        return [
            f"{file}\t{t}\t{names[int(c)]}\t{float(v):.4f}"
            for t, (c, v) in enumerate(zip(p.indices, p.values, strict=True))
        ]


class StepRegression(StepTargets):
    name = "step_regression"
    target_kind = "per_step_value"
    metric = Metric("mse", higher_is_better=False, log_scale=True)

    def model_args(self) -> dict:
        return tagger_args(self.cfg.model, self.data.feature_count, int(self.data.manifest["outputs"]))

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        with autocast:
            out = model(batch.x, batch.lengths)
        squared = ((out.float() - batch.y) ** 2).sum(dim=2) * real_steps(batch)
        return squared.sum() * (self.info.world_size / (batch.global_steps * batch.y.shape[2]))

    def step_sums(self, output: torch.Tensor, batch: PaddedBatch) -> dict[str, float]:
        real = real_steps(batch)[:, :, None]
        mean = torch.tensor(self.data.manifest["target_mean"], device=output.device)
        return {
            "sse": float((((output - batch.y) ** 2) * real).sum()),
            "mean_sse": float((((mean - batch.y) ** 2) * real).sum()),  # always predicting the train mean
            "values": float(real.sum()) * batch.y.shape[2],
        }

    def step_predictions(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def evaluate(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean squared error over every real step (and value) of every sequence; ``loss`` is the same."""
        sums, examples = self.run_split(module, split, autocast, detail=detail)
        mse = sums["sse"] / sums["values"]
        result: dict[str, Any] = {"loss": mse, "mse": mse, "samples": int(split.offsets[-1])}
        if detail:
            result["mean_mse"] = sums["mean_sse"] / sums["values"]
            result["examples"] = examples
        return result

    def report(self, result: dict[str, Any], split: SplitArrays) -> list[str]:
        return [
            f"test mse {result['mse']:.6g}  ({result['samples']} steps); "
            f"always predicting the train mean: {result['mean_mse']:.6g}"
        ]

    def predict_lines(self, file: str, output: torch.Tensor) -> list[str]:
        return [f"{file}\t{t}\t" + "\t".join(f"{float(v):.6g}" for v in row) for t, row in enumerate(output)]
