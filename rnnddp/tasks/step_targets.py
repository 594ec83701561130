"""Per-step targets on a folder ``rnnddp-prepare`` made: a class at every step (step_classification)
or values at every step (step_regression); the loss counts each sequence's real steps only.

Normalisation: a rank's loss is its steps' summed loss over the real steps of the whole global
batch (``PaddedBatch.global_steps``, the same on every rank) times the world size. DDP averages
the ranks' gradients, so the gradient is that of the mean over all the global batch's real
steps: the same on 1 or N ranks, however the steps fall among the ranks' shares.
"""

from __future__ import annotations

import contextlib
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


class StepTargets(PreparedSequences):
    """The shared evaluation loop: per-step outputs of every sequence, in the split's flat step order."""

    def step_sums(self, output: torch.Tensor, batch: PaddedBatch) -> dict[str, float]:
        """This batch's summed per-step figures (loss, and the task's own)."""
        raise NotImplementedError

    @torch.no_grad()
    def run_split(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, keep: bool
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """Summed figures over every real step, and (``keep``) the outputs [total_steps, ...] in split order."""
        was_training = module.training
        module.eval()
        sums: dict[str, float] = {}
        kept = None
        for index, batch in self.eval_batches(split):
            with autocast:
                out = module(batch.x, batch.lengths).float()
            for k, v in self.step_sums(out, batch).items():
                sums[k] = sums.get(k, 0.0) + v
            if keep:
                out = out.cpu()
                kept = torch.zeros((int(split.offsets[-1]), *out.shape[2:])) if kept is None else kept
                for row, i in enumerate(index):
                    start, stop = int(split.offsets[i]), int(split.offsets[i + 1])
                    kept[start:stop] = out[row, : stop - start]
        module.train(was_training)
        return sums, kept

    def pictures(self, result: dict[str, Any], split: SplitArrays) -> dict[str, Picture]:
        names = self.data.class_names or None
        return {"test_sequences": lambda out: plots.step_examples(split, result["predictions"], out, names=names)}


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

    def evaluate(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean cross-entropy and accuracy over every real step of every sequence."""
        sums, logits = self.run_split(module, split, autocast, keep=detail)
        n = sums["steps"]
        result: dict[str, Any] = {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "samples": int(n)}
        if detail:
            classes = len(self.data.class_names)
            probs = logits.softmax(dim=1).max(dim=1)
            truth = torch.from_numpy(np.array(split.targets, dtype=np.int64))
            result["confusion"] = torch.bincount(truth * classes + probs.indices, minlength=classes * classes).view(
                classes, classes
            )
            result["predictions"], result["probabilities"] = probs.indices, probs.values
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

    def evaluate(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean squared error over every real step (and value) of every sequence; ``loss`` is the same."""
        sums, out = self.run_split(module, split, autocast, keep=detail)
        mse = sums["sse"] / sums["values"]
        result: dict[str, Any] = {"loss": mse, "mse": mse, "samples": int(split.offsets[-1])}
        if detail:
            result["mean_mse"] = sums["mean_sse"] / sums["values"]
            result["predictions"] = out
        return result

    def report(self, result: dict[str, Any], split: SplitArrays) -> list[str]:
        return [
            f"test mse {result['mse']:.6g}  ({result['samples']} steps); "
            f"always predicting the train mean: {result['mean_mse']:.6g}"
        ]

    def predict_lines(self, file: str, output: torch.Tensor) -> list[str]:
        return [f"{file}\t{t}\t" + "\t".join(f"{float(v):.6g}" for v in row) for t, row in enumerate(output)]
