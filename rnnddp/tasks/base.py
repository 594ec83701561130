"""What a task is: everything about *what* is trained, apart from *how* (rnnddp/train/).

A task owns its config section, its train/validation/test splits, its batches, the model's
constructor arguments, the loss of a batch, its evaluation and the metric that picks ``best.pt``,
what must match on resume, what it adds to a checkpoint, and its pictures. ``rnnddp.job`` looks
the task up once (``rnnddp.tasks.TASKS``) and wires these into the generic trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rnnddp.data.batches import Split
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.export.graphs import Tensor
from rnnddp.metrics import Metric
from rnnddp.train.trainer import Batches

Picture = Callable[[Path], Path]  # draws one picture into the given file


def per_class_report(result: dict[str, Any], names: list[str], unit: str) -> list[str]:
    """evaluate's lines for a classification result with ``detail``: overall, then each class by name."""
    confusion = result["confusion"]
    totals = confusion.sum(dim=1)
    per_class = (confusion.diagonal().double() / totals.clamp(min=1)).tolist()
    lines = [f"test loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  ({result['samples']} {unit})"]
    lines.append("per-class accuracy:")
    lines += [f"  {name}: {acc:.4f}  ({int(n)} {unit})" for name, acc, n in zip(names, per_class, totals, strict=True)]
    return lines


@dataclass
class Splits:
    train: Split
    val: Split | None  # None: no validation (no periodic evaluation, no best.pt)
    test: Split


@dataclass
class Serving:
    """What an exported model takes from a caller, and what a server needs to know (rnnddp-export)."""

    prepare: nn.Module  # the caller's input -> the network's, inside the graph (normalisation, the view)
    given: Tensor  # the caller's input
    lengths: bool  # the graph also takes each sequence's length
    meta: dict[str, Any]  # into serving.json: class names, the vocabulary, what prepare does


class Task:
    name: ClassVar[str]
    section: ClassVar[str]  # the config section it owns (cfg.<section>)
    Section: ClassVar[type]  # that section's dataclass: keys, types and defaults
    metric: ClassVar[Metric]
    cuda_graph_unsupported: ClassVar[str | None] = None  # why train.cuda_graph cannot hold its step
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # allowed values of its config keys, from their registries
    # Keys of its section that may change on resume (where the data lives, not what it is); every
    # other key must match the checkpoint's (rnnddp/resume.py).
    RESUME_SAFE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Refuse settings this task cannot train (raise UserError with one line)."""

    def __init__(self, cfg: Any, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info

    @property
    def settings(self) -> Any:
        """This task's own config section."""
        return getattr(self.cfg, self.section)

    def model_args(self) -> dict:
        raise NotImplementedError

    def init_weights(self, module: nn.Module) -> None:
        """Changes to the network's initial weights that this task's settings ask for (a resume loads the
        checkpoint's over them)."""

    def load(self) -> Splits:
        """Train, validation and test splits (may use collectives: every rank calls it)."""
        raise NotImplementedError

    def train_batches(self, split: Split) -> Batches:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(
        self, module: nn.Module, split: Split, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """``loss`` and ``metric.name`` over every sample of ``split`` (rank 0 alone; no collectives).

        ``detail`` adds what pictures and reports need (predictions, a confusion matrix).
        """
        raise NotImplementedError

    def check_restorable(self, saved_args: dict, path: Path) -> None:
        """Refuse to feed a checkpoint's network (``saved_args``) inputs it was not built for."""
        wanted, given = saved_args.get("input_size"), self.model_args().get("input_size")
        if wanted is not None and given is not None and wanted != given:
            raise UserError(
                f"checkpoint {path} expects {wanted} features per step; this config gives {given}; "
                "leave the data settings as the checkpoint has them"
            )

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint trained on other data that the config keys do not show (raise UserError
        naming the fix); the keys themselves are compared by rnnddp/resume.py."""

    def state_dict(self) -> dict[str, Any]:
        """Entries this task adds to a checkpoint (every rank calls it; it may gather)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what ``state_dict`` stored (a resume, or evaluate restoring a checkpoint)."""

    def pictures(self, result: dict[str, Any], split: Split) -> dict[str, Picture]:
        """Pictures of an evaluation with ``detail``: name -> drawer."""
        return {}

    def describe(self) -> str:
        """What was trained, in a few words (evaluate's header)."""
        return f"task {self.name}"

    def report(self, result: dict[str, Any], split: Split) -> list[str]:
        """evaluate's printed lines for a test result with ``detail``."""
        name = self.metric.name
        return [f"test loss {result['loss']:.4f}  {name} {result[name]:.4f}  ({int(result['samples'])} samples)"]

    def predict(self, module: nn.Module, files: list[str], path: Path) -> list[str]:
        """``rnnddp-predict``'s printed lines for ``files`` (read and checked before any is predicted).

        ``module`` is the restored network in eval mode; ``path`` its checkpoint, for messages.
        """
        raise UserError(
            f"{path} is a task={self.name} model; rnnddp-predict takes digit images (task=classify) "
            "or sequences (the sequence tasks)"
        )

    def serving(self) -> Serving:
        """The exported graph's input and what travels with it (``rnnddp-export``)."""
        raise UserError(f"task={self.name} cannot be exported yet")
