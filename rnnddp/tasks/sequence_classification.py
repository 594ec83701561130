"""sequence_classification: one class per variable-length sequence, from a folder ``rnnddp-prepare`` made.

The splits are the folder's train/val/test (validation carved from train when it was prepared),
memory-mapped: each rank reads only its batches' rows. The network's input size and class
count come from the folder's manifest, so one config serves any prepared data set. Batches are
length-bucketed and padded to their longest sequence; the network runs them packed, so padding
changes nothing (``SequenceClassifier(x, lengths)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnddp import plots
from rnnddp.data.sequences import SequenceBatches, SplitArrays, open_prepared, pad_batch
from rnnddp.errors import UserError
from rnnddp.metrics import Metric
from rnnddp.models import classifier_args
from rnnddp.tasks.base import Picture, Splits, Task, per_class_report


@dataclass
class SequencesConfig:
    path: str = ""  # a folder made by rnnddp-prepare
    normalize: bool = True  # by the train split's mean and std per feature (in the manifest)
    bucket: bool = True  # length-bucketed batches; false: random batches, each padded to its longest
    bucket_pool: int = 50  # global batches per sorting pool (larger: less padding, less random batches)


class SequenceClassification(Task):
    name = "sequence_classification"
    section = "sequences"
    Section = SequencesConfig
    metric = Metric("accuracy", higher_is_better=True)
    cuda_graph_unsupported = "batches of variable length change shape from step to step"
    # The order and position in an epoch depend on these (the folder itself is checked by its manifest).
    RESUME_KEYS = ("train.global_batch_size", "sequences.bucket", "sequences.bucket_pool")

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if not cfg.sequences.path:
            raise UserError(
                "task=sequence_classification needs sequences.path=DIR, a folder made by "
                "rnnddp-prepare --train FILE --test FILE --out DIR"
            )
        if cfg.model.name != "rnn":
            raise UserError(f"task=sequence_classification needs model.name=rnn, not {cfg.model.name!r}")
        if cfg.sequences.bucket_pool < 1:
            raise UserError("bad value for config key 'sequences.bucket_pool': must be >= 1")

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        self.data = open_prepared(Path(cfg.sequences.path))
        if self.data.per_step:
            raise UserError(
                f"{cfg.sequences.path} has per-step labels; task=sequence_classification needs one label per sequence"
            )
        m = self.data.manifest
        norm = cfg.sequences.normalize
        self.mean = np.asarray(m["mean"], dtype=np.float32) if norm else None
        self.std = np.asarray(m["std"], dtype=np.float32) if norm else None

    def model_args(self) -> dict:
        return classifier_args(
            self.cfg.model, input_size=self.data.feature_count, num_classes=len(self.data.class_names)
        )

    def load(self) -> Splits:
        return Splits(self.data.split("train"), self.data.split("val"), self.data.split("test"))

    def train_batches(self, split: SplitArrays) -> SequenceBatches:
        s = self.settings
        return SequenceBatches(
            split,
            global_batch_size=self.cfg.train.global_batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            seed=self.cfg.seed,
            device=self.info.device,
            mean=self.mean,
            std=self.std,
            bucket=s.bucket,
            pool=s.bucket_pool,
        )

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        x, lengths, y = batch
        with autocast:
            logits = model(x, lengths)
        return F.cross_entropy(logits.float(), y)

    @torch.no_grad()
    def evaluate(
        self, module: nn.Module, split: SplitArrays, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean cross-entropy and accuracy over every sequence, in batches of similar length."""
        device = self.info.device
        classes = len(self.data.class_names)
        was_training = module.training
        module.eval()
        order = np.argsort(split.lengths, kind="stable")  # similar lengths together: little padding
        loss_sum, correct = 0.0, 0
        preds = torch.zeros(len(split), dtype=torch.long)
        probs = torch.zeros(len(split))
        for start in range(0, len(split), self.cfg.eval.batch_size):
            index = order[start : start + self.cfg.eval.batch_size]
            x, lengths, y = pad_batch(split, index, self.mean, self.std)
            with autocast:
                logits = module(x.to(device), lengths).float()
            y = y.to(device)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            p = logits.softmax(dim=1).max(dim=1)
            correct += int((p.indices == y).sum())
            preds[torch.from_numpy(index)] = p.indices.cpu()
            probs[torch.from_numpy(index)] = p.values.cpu()
        module.train(was_training)
        n = len(split)
        result: dict[str, Any] = {"loss": loss_sum / n, "accuracy": correct / n, "samples": n}
        if detail:
            truth = torch.from_numpy(np.array(split.labels, dtype=np.int64))
            result["confusion"] = torch.bincount(truth * classes + preds, minlength=classes * classes).view(
                classes, classes
            )
            result["predictions"], result["probabilities"] = preds, probs
        return result

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        super().check_resume(state, path)
        saved = state.get("sequences_manifest")
        now = self._fingerprint()
        if saved is not None and saved != now:
            raise UserError(
                f"checkpoint {path} was trained on another prepared data set (its splits differ from "
                f"{self.cfg.sequences.path}); point sequences.path at that folder or start a new run with another name="
            )

    def _fingerprint(self) -> dict[str, Any]:
        m = self.data.manifest
        return {"features": m["features"], "classes": m["classes"], "splits": m["splits"]}

    def state_dict(self) -> dict[str, Any]:
        return {"sequences_manifest": self._fingerprint()}

    def pictures(self, result: dict[str, Any], split: SplitArrays) -> dict[str, Picture]:
        conf, preds, names = result["confusion"], result["predictions"], self.data.class_names
        return {
            "confusion_matrix": lambda out: plots.confusion_matrix(conf, out, names=names),
            "test_sequences": lambda out: plots.sequence_examples(split, preds, names, out),
        }

    def describe(self) -> str:
        m = self.cfg.model
        net = f"{'bi' if m.bidirectional else ''}{m.cell}-{m.hidden_size}x{m.num_layers}"
        return f"{net}, sequences {self.cfg.sequences.path}"

    def report(self, result: dict[str, Any], split: SplitArrays) -> list[str]:
        return per_class_report(result, self.data.class_names, "sequences")
