"""The exported graphs: each network with its task's input preparation, in one module per architecture.

A graph takes what a caller has (uint8 images, raw feature sequences and their lengths, token ids) and,
for the stateful networks, their state; it returns the network's outputs and the new state, so a
caller continues a stream chunk by chunk. ``run`` is how the recurrent stack runs
(``rnnddp.export.recurrence``): the modules themselves for ONNX, a scan for ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rnnddp.models import ConvClassifier, LanguageModel, SequenceClassifier, SequenceRegressor, SequenceTagger

Run = Callable[[nn.RNNBase, torch.Tensor, "torch.Tensor | None", Any], "tuple[torch.Tensor, Any]"]


@dataclass
class Tensor:
    """One input or output of a graph, as serving.json describes it."""

    name: str
    dtype: str  # numpy's name: float32, int64, uint8
    shape: list[int | str]  # "batch", "time": free; numbers: fixed
    meaning: str
    high: int | None = None  # integer inputs: values lie in [0, high)


@dataclass
class Graph:
    module: nn.Module
    inputs: list[Tensor]
    outputs: list[Tensor]
    state: list[tuple[str, str]] = field(default_factory=list)  # (input, output) pairs to feed back


def _state_tensors(rnn: nn.RNNBase, prefix: str, layers: int) -> list[tuple[Tensor, Tensor]]:
    parts = ["h", "c"] if isinstance(rnn, nn.LSTM) else ["h"]
    shape: list[int | str] = [layers, "batch", rnn.hidden_size]
    what = {"h": "hidden state", "c": "cell state"}
    return [
        (
            Tensor(f"{prefix}{p}", "float32", shape, f"the {what[p]} to start from (zeros to start a stream)"),
            Tensor(f"{prefix}{p}_out", "float32", shape, f"the {what[p]} after the last step: feed it back next"),
        )
        for p in parts
    ]


def _pack(rnn: nn.RNNBase, parts: tuple[torch.Tensor, ...]) -> Any:
    return (parts[0], parts[1]) if isinstance(rnn, nn.LSTM) else parts[0]


def _unpack(state: Any) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)


class ClassifierGraph(nn.Module):
    """prepared input [B, T, F] (and lengths) -> logits [B, C]: the top layer read at each sequence's end."""

    def __init__(self, model: SequenceClassifier, prepare: nn.Module, run: Run, lengths: bool) -> None:
        super().__init__()
        self.model, self.prepare, self.run, self.lengths = model, prepare, run, lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.prepare(x)
        out, _ = self.run(self.model.rnn, x, lengths, None)
        last = (lengths - 1) if lengths is not None else torch.full((x.shape[0],), x.shape[1] - 1, dtype=torch.long)
        rows = torch.arange(x.shape[0])
        h = self.model.rnn.hidden_size
        forward_end = out[rows, last, :h]
        if self.model.directions == 1:
            return self.model.head(forward_end)
        return self.model.head(torch.cat([forward_end, out[:, 0, h:]], dim=-1))  # backward ends at step 0


class ConvGraph(nn.Module):
    def __init__(self, model: ConvClassifier, prepare: nn.Module) -> None:
        super().__init__()
        self.model, self.prepare = model, prepare

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))


class TaggerGraph(nn.Module):
    """prepared input [B, T, F] and lengths -> an output at every step [B, T, K], zero past each end."""

    def __init__(self, model: SequenceTagger, prepare: nn.Module, run: Run) -> None:
        super().__init__()
        self.model, self.prepare, self.run = model, prepare, run

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.run(self.model.rnn, self.prepare(x), lengths, None)
        real = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return self.model.head(out) * real.unsqueeze(-1).to(out.dtype)


class RegressorGraph(nn.Module):
    """x [B, T, F] and the state -> a prediction at every step and the new state."""

    def __init__(self, model: SequenceRegressor, prepare: nn.Module, run: Run) -> None:
        super().__init__()
        self.model, self.prepare, self.run = model, prepare, run

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, new = self.run(self.model.rnn, self.prepare(x), None, _pack(self.model.rnn, state))
        return (self.model.head(out), *_unpack(new))


class LanguageModelGraph(nn.Module):
    """tokens [B, T] and every layer's state -> log-probabilities of the next token [B, T, V] and the new state."""

    def __init__(self, model: LanguageModel, prepare: nn.Module, run: Run) -> None:
        super().__init__()
        self.model, self.prepare, self.run = model, prepare, run
        self.per_layer = 2 if isinstance(model.layers[0], nn.LSTM) else 1

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, n = self.model, self.per_layer
        x = m.embedding(self.prepare(tokens))
        new: list[torch.Tensor] = []
        for k, layer in enumerate(m.layers):
            x, s = self.run(layer, x, None, _pack(layer, state[k * n : (k + 1) * n]))
            new += _unpack(s)
        flat = x.reshape(-1, x.shape[-1])
        logp = m.adaptive.log_prob(flat) if m.adaptive is not None else torch.log_softmax(m.decoder(flat), dim=-1)
        return (logp.reshape(x.shape[0], x.shape[1], -1), *new)


def build_graph(model: nn.Module, prepare: nn.Module, given: Tensor, lengths: bool, run: Run) -> Graph:
    """The graph for ``model`` fed by its task's ``prepare`` from the caller's input ``given``."""
    lengths_in = Tensor("lengths", "int64", ["batch"], "each sequence's length; steps past it are padding")
    if isinstance(model, ConvClassifier):
        logits = Tensor("logits", "float32", ["batch", model.args["num_classes"]], "a score per class")
        return Graph(ConvGraph(model, prepare), [given], [logits])
    if isinstance(model, SequenceClassifier):
        logits = Tensor("logits", "float32", ["batch", model.args["num_classes"]], "a score per class")
        inputs = [given, lengths_in] if lengths else [given]
        return Graph(ClassifierGraph(model, prepare, run, lengths), inputs, [logits])
    if isinstance(model, SequenceTagger):
        out = Tensor("outputs", "float32", ["batch", "time", model.args["output_size"]], "an output per step")
        return Graph(TaggerGraph(model, prepare, run), [given, lengths_in], [out])
    if isinstance(model, SequenceRegressor):
        pairs = _state_tensors(model.rnn, "", model.rnn.num_layers)
        out = Tensor("outputs", "float32", ["batch", "time", model.args["output_size"]], "a prediction per step")
        return Graph(
            RegressorGraph(model, prepare, run),
            [given, *(i for i, _ in pairs)],
            [out, *(o for _, o in pairs)],
            [(i.name, o.name) for i, o in pairs],
        )
    if isinstance(model, LanguageModel):
        pairs = [p for k, layer in enumerate(model.layers) for p in _state_tensors(layer, f"layer{k}_", 1)]
        logp = Tensor(
            "log_probs", "float32", ["batch", "time", model.args["vocab_size"]], "log-probabilities of the next token"
        )
        return Graph(
            LanguageModelGraph(model, prepare, run),
            [given, *(i for i, _ in pairs)],
            [logp, *(o for _, o in pairs)],
            [(i.name, o.name) for i, o in pairs],
        )
    raise TypeError(f"no export graph for {type(model).__name__}")


class Standardise(nn.Module):
    """(x - mean) / std per feature, the train split's statistics baked in; no statistics: x as it is."""

    def __init__(self, mean: Any = None, std: Any = None) -> None:
        super().__init__()
        self.on = mean is not None
        self.register_buffer("mean", torch.as_tensor(mean if self.on else 0.0, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(std if self.on else 1.0, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.on else x
