"""What every task on a folder made by ``rnnddp-prepare`` shares (the ``sequences`` config section).

The splits are the folder's train/val/test (validation carved from train when it was prepared),
memory-mapped: each rank reads only its batches' rows. The network's input size and output count
come from the folder's manifest, so one config serves any prepared data set. Training batches are
length-bucketed and padded to their longest sequence; the networks take each sequence's length,
so padding changes nothing. A subclass says which of the manifest's targets it trains and adds
its loss, evaluation, report and pictures.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rnnddp.data.readers import read_sequence_file
from rnnddp.data.sequences import TARGET_KINDS, PaddedBatch, SequenceBatches, SplitArrays, open_prepared, pad_batch
from rnnddp.errors import UserError
from rnnddp.export.graphs import Standardise, Tensor
from rnnddp.tasks.base import Serving, Splits, Task

# The manifest's target kind -> the task that trains it.
TASK_OF_TARGET = {
    "label": "sequence_classification",
    "per_step": "step_classification",
    "per_step_value": "step_regression",
}


@dataclass
class SequencesConfig:
    path: str = ""  # a folder made by rnnddp-prepare
    normalize: bool = True  # by the train split's mean and std per feature (in the manifest)
    bucket: bool = True  # length-bucketed batches; false: random batches, each padded to its longest
    bucket_pool: int = 50  # global batches per sorting pool (larger: less padding, less random batches)


class PreparedSequences(Task):
    section = "sequences"
    Section = SequencesConfig
    target_kind: ClassVar[str]  # the manifest's "target" this task trains
    cuda_graph_unsupported = "batches of variable length change shape from step to step"
    # The folder may move: its splits are checked by their manifest (check_resume).
    RESUME_SAFE = ("sequences.path",)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if not cfg.sequences.path:
            raise UserError(
                f"task={cls.name} needs sequences.path=DIR, a folder made by "
                "rnnddp-prepare --train FILE --test FILE --out DIR"
            )
        if cfg.model.name != "rnn":
            raise UserError(f"task={cls.name} needs model.name=rnn, not {cfg.model.name!r}")
        if cfg.sequences.bucket_pool < 1:
            raise UserError("bad value for config key 'sequences.bucket_pool': must be >= 1")

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        self.data = open_prepared(Path(cfg.sequences.path))
        kind = self.data.target_kind
        if kind != self.target_kind:
            raise UserError(
                f"{cfg.sequences.path} holds {TARGET_KINDS[kind]}; train it with task={TASK_OF_TARGET[kind]} "
                f"(task={self.name} needs {TARGET_KINDS[self.target_kind]})"
            )
        m = self.data.manifest
        norm = cfg.sequences.normalize
        self.mean = np.asarray(m["mean"], dtype=np.float32) if norm else None
        self.std = np.asarray(m["std"], dtype=np.float32) if norm else None

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

    def eval_batches(self, split: SplitArrays) -> Iterator[tuple[np.ndarray, PaddedBatch]]:
        """Every sequence once, in batches of similar length (little padding): (indices, batch on the device).

        Read batch by batch from the mapped files as training reads them (one ``pread`` per sequence), so
        rank 0 evaluates a validation or test split larger than memory; an evaluation keeps sums, not the
        split's per-step outputs (tests/unit/test_eval_memory.py).
        """
        order = np.argsort(split.lengths, kind="stable")
        for start in range(0, len(split), self.cfg.eval.batch_size):
            index = order[start : start + self.cfg.eval.batch_size]
            x, lengths, y, steps = pad_batch(split, index, self.mean, self.std)
            yield index, PaddedBatch(x.to(self.info.device), lengths, y.to(self.info.device), steps)

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        super().check_resume(state, path)
        saved = state.get("sequences_manifest")
        if saved is not None and saved != self._fingerprint():
            raise UserError(
                f"checkpoint {path} was trained on another prepared data set (its splits differ from "
                f"{self.cfg.sequences.path}); point sequences.path at that folder or start a new run with another name="
            )

    def _fingerprint(self) -> dict[str, Any]:
        m = self.data.manifest
        return {"features": m["features"], "classes": m["classes"], "splits": m["splits"]}

    def state_dict(self) -> dict[str, Any]:
        return {"sequences_manifest": self._fingerprint()}

    def describe(self) -> str:
        m = self.cfg.model
        net = f"{'bi' if m.bidirectional else ''}{m.cell}-{m.hidden_size}x{m.num_layers}"
        return f"{net}, sequences {self.cfg.sequences.path}"

    @torch.no_grad()
    def predict(self, module: nn.Module, files: list[str], path: Path) -> list[str]:
        seqs = [read_sequence_file(Path(f), self.data.feature_count) for f in files]  # all checked first
        lines = []
        for f, seq in zip(files, seqs, strict=True):
            x = seq if self.mean is None else (seq - self.mean) / self.std
            out = module(torch.from_numpy(x)[None].to(self.info.device), torch.tensor([len(x)])).float().cpu()
            lines += self.predict_lines(f, out[0])
        return lines

    def serving(self) -> Serving:
        features = self.data.feature_count
        x = Tensor("x", "float32", ["batch", "time", features], "sequences as the data files hold them, zero-padded")
        meta: dict[str, Any] = {"classes": self.data.class_names}
        if self.mean is not None:
            meta["preparation_in_graph"] = {"standardise": {"mean": self.mean.tolist(), "std": self.std.tolist()}}
        return Serving(Standardise(self.mean, self.std), x, lengths=True, meta=meta)

    def predict_lines(self, file: str, output: torch.Tensor) -> list[str]:
        """The printed lines for one sequence's network output (logits [C], or per step [T, C] / [T, K])."""
        raise NotImplementedError
