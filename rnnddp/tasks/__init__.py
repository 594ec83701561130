"""The tasks and their registry: one module per task, one line here (see base.py for the protocol)."""

from __future__ import annotations

from rnnddp.tasks.base import Splits, Task
from rnnddp.tasks.classify import Classify
from rnnddp.tasks.language_model import LanguageModel
from rnnddp.tasks.sequence_classification import SequenceClassification
from rnnddp.tasks.sine_regression import SineRegression
from rnnddp.tasks.step_targets import StepClassification, StepRegression

TASKS: dict[str, type[Task]] = {
    "classify": Classify,
    "sine_regression": SineRegression,
    "sequence_classification": SequenceClassification,
    "step_classification": StepClassification,
    "step_regression": StepRegression,
    "language_model": LanguageModel,
}

__all__ = ["TASKS", "Splits", "Task"]
