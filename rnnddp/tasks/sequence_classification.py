"""sequence_classification: one class per variable-length sequence, from a folder ``rnnddp-prepare`` made.

The folder, batches and resume checks are prepared.py's; here: the loss, the evaluation with a
confusion matrix by class name, the report, the pictures and the prediction lines.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnddp import plots
from rnnddp.data.sequences import SplitArrays
from rnnddp.metrics import Metric
from rnnddp.models import classifier_args
from rnnddp.tasks.base import Picture, per_class_report
from rnnddp.tasks.prepared import PreparedSequences


class SequenceClassification(PreparedSequences):
    name = "sequence_classification"
    target_kind = "label"
    metric = Metric("accuracy", higher_is_better=True)

    def model_args(self) -> dict:
        return classifier_args(
            self.cfg.model, input_size=self.data.feature_count, num_classes=len(self.data.class_names)
        )

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        with autocast:
            logits = model(batch.x, batch.lengths)
        return F.cross_entropy(logits.float(), batch.y)

    @torch.no_grad()
    def evaluate(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean cross-entropy and accuracy over every sequence, read batch by batch.

        ``detail`` adds the confusion matrix, summed batch by batch, and each sequence's predicted
        class and its probability (one number each, as the offsets are; the picture picks from them).
        """
        classes = len(self.data.class_names)
        was_training = module.training
        module.eval()
        loss_sum, correct = 0.0, 0
        confusion = torch.zeros(classes * classes, dtype=torch.long)
        preds = torch.zeros(len(split), dtype=torch.long) if detail else None
        probs = torch.zeros(len(split)) if detail else None
        for index, batch in self.eval_batches(split):
            with autocast:
                logits = module(batch.x, batch.lengths).float()
            loss_sum += F.cross_entropy(logits, batch.y, reduction="sum").item()
            p = logits.softmax(dim=1).max(dim=1)
            correct += int((p.indices == batch.y).sum())
            if detail:
                predicted, y = p.indices.cpu(), batch.y.cpu()
                confusion += torch.bincount(y * classes + predicted, minlength=classes * classes)
                preds[torch.from_numpy(index)] = predicted
                probs[torch.from_numpy(index)] = p.values.cpu()
        module.train(was_training)
        n = len(split)
        result: dict[str, Any] = {"loss": loss_sum / n, "accuracy": correct / n, "samples": n}
        if detail:
            result["confusion"] = confusion.view(classes, classes)
            result["predictions"], result["probabilities"] = preds, probs
        return result

    def pictures(self, result: dict[str, Any], split: SplitArrays) -> dict[str, Picture]:
        conf, preds, names = result["confusion"], result["predictions"], self.data.class_names
        return {
            "confusion_matrix": lambda out: plots.confusion_matrix(conf, out, names=names),
            "test_sequences": lambda out: plots.sequence_examples(split, preds, names, out),
        }

    def report(self, result: dict[str, Any], split: SplitArrays) -> list[str]:
        return per_class_report(result, self.data.class_names, "sequences")

    def predict_lines(self, file: str, output: torch.Tensor) -> list[str]:
        p = output.softmax(dim=0)
        return [f"{file}\t{self.data.class_names[int(p.argmax())]}\t{float(p.max()):.4f}"]
