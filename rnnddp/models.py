"""The networks and their registry: recurrent classifiers, per-step taggers and regressors, the seed's small CNN.

Pure torch: no knowledge of DDP, tasks or logging.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def recurrent_stack(
    cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool
) -> nn.RNNBase:
    """The batch-first recurrent stack of the classifier and the tagger (dropout between layers only)."""
    return CELLS[cell](
        input_size,
        hidden_size,
        num_layers=num_layers,
        batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0,
        bidirectional=bidirectional,
    )


class SequenceClassifier(nn.Module):
    """[B, T, input_size] -> recurrent stack -> Linear on the last step's hidden state -> logits.

    For a bidirectional stack the head sees both directions' final states (forward at step T,
    backward at step 1), concatenated.
    """

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 28,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.args = dict(
            cell=cell,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            bidirectional=bidirectional,
            num_classes=num_classes,
        )
        self.rnn = recurrent_stack(cell, input_size, hidden_size, num_layers, dropout, bidirectional)
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(hidden_size * self.directions, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``lengths`` (a CPU int tensor, one per sequence): ``x`` is padded after each sequence's end,
        and padding changes nothing. A one-way stack runs padded and is read at each sequence's last
        real step (what comes after cannot reach back); a bidirectional one runs packed, so that its
        backward direction starts at that step. Padded is the faster on CPUs (docs/performance.md)."""
        if lengths is not None and self.directions == 1:
            out, _ = self.rnn(x)
            return self.head(out[torch.arange(out.shape[0], device=out.device), lengths.to(out.device) - 1])
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        # h_n: [layers * directions, B, H]; take the top layer's final state per direction.
        last = h_n[-self.directions :].transpose(0, 1).reshape(h_n.shape[1], -1)
        return self.head(last)


class SequenceTagger(nn.Module):
    """[B, T, input_size] and each sequence's length -> an output at every step, [B, T, output_size].

    A class or K values at every step. A one-way stack runs padded (a step's output never sees what
    comes after it); a bidirectional one runs packed, so that its backward direction starts at each
    sequence's last real step. Outputs past a sequence's end mean nothing (the loss masks them).
    """

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 1,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        output_size: int = 1,
    ) -> None:
        super().__init__()
        self.args = dict(
            name="tagger",
            cell=cell,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            bidirectional=bidirectional,
            output_size=output_size,
        )
        self.rnn = recurrent_stack(cell, input_size, hidden_size, num_layers, dropout, bidirectional)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), output_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None or not self.rnn.bidirectional:
            out, _ = self.rnn(x)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.head(out)


class SequenceRegressor(nn.Module):
    """[B, T, input_size] and a hidden state -> a prediction at every step, and the new state.

    The caller carries the state from one chunk of a sequence to the next (the sine task);
    ``state=None`` starts a sequence from zeros.
    """

    def __init__(
        self, cell: str = "rnn", input_size: int = 1, hidden_size: int = 32, num_layers: int = 1, output_size: int = 1
    ) -> None:
        super().__init__()
        self.args = dict(
            name="regressor",
            cell=cell,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            output_size=output_size,
        )
        self.rnn = CELLS[cell](input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.rnn(x, state)
        return self.head(out), state


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence, shared by all its steps (variational dropout, as AWD-LSTM)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, F]
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class LanguageModel(nn.Module):
    """Tokens [B, T] and a carried state -> the next token's log-probabilities (or the targets' losses).

    Embedding -> a stack of one-layer LSTM/GRU (each a fused cuDNN call on GPUs), locked dropout on
    the embedding, between layers and on the output -> a decoder whose weight is the embedding's
    (tied; the top layer then has ``emb_size`` units) or an adaptive softmax for large vocabularies.
    The state is a list with one entry per layer (an LSTM's is its (h, c) pair).
    """

    def __init__(
        self,
        cell: str = "lstm",
        vocab_size: int = 65,
        emb_size: int = 128,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        dropout_emb: float = 0.0,
        dropout_out: float = 0.0,
        tie_weights: bool = True,
        adaptive_cutoffs: list[int] | None = None,
    ) -> None:
        super().__init__()
        cutoffs = list(adaptive_cutoffs or [])
        self.args = dict(
            name="language_model",
            cell=cell,
            vocab_size=vocab_size,
            emb_size=emb_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            dropout_emb=dropout_emb,
            dropout_out=dropout_out,
            tie_weights=tie_weights,
            adaptive_cutoffs=cutoffs,
        )
        self.embedding = nn.Embedding(vocab_size, emb_size)
        top = emb_size if tie_weights else hidden_size
        sizes = [emb_size] + [hidden_size] * (num_layers - 1) + [top]
        self.layers = nn.ModuleList(CELLS[cell](sizes[k], sizes[k + 1], batch_first=True) for k in range(num_layers))
        self.drop_emb, self.drop_mid, self.drop_out = (
            LockedDropout(dropout_emb),
            LockedDropout(dropout),
            LockedDropout(dropout_out),
        )
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(top, vocab_size, cutoffs) if cutoffs else None
        self.decoder = None if cutoffs else nn.Linear(top, vocab_size)
        if self.decoder is not None and tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_uniform_(self, r: float) -> None:
        """pytorch/examples' and AWD-LSTM's initial weights: the embedding (and an untied decoder's weight) from
        uniform(-r, r), the decoder's bias 0. With a tied decoder, nn.Embedding's N(0, 1) makes the first logits
        ~sqrt(emb_size) wide; small embeddings in turn learn slowly under Adam (docs/results.md)."""
        with torch.no_grad():
            self.embedding.weight.uniform_(-r, r)
            if self.decoder is not None:
                self.decoder.bias.zero_()
                if self.decoder.weight is not self.embedding.weight:
                    self.decoder.weight.uniform_(-r, r)

    def forward(
        self, tokens: torch.Tensor, state: list | None = None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list]:
        """(log-probabilities [B, T, V], new state); with ``targets`` [B, T]: (each target's loss [B, T], new state)."""
        x = self.drop_emb(self.embedding(tokens))
        new_state = []
        for k, layer in enumerate(self.layers):
            x, s = layer(x, None if state is None else state[k])
            new_state.append(s)
            x = self.drop_mid(x) if k < len(self.layers) - 1 else self.drop_out(x)
        flat = x.reshape(-1, x.shape[-1])
        if self.adaptive is not None:
            if targets is not None:
                out = -self.adaptive(flat.float(), targets.reshape(-1)).output
                return out.view(targets.shape), new_state
            return self.adaptive.log_prob(flat.float()).view(*x.shape[:2], -1), new_state
        logits = self.decoder(flat).float()  # the softmax in fp32 under any autocast
        if targets is not None:
            return F.cross_entropy(logits, targets.reshape(-1), reduction="none").view(targets.shape), new_state
        return torch.log_softmax(logits, dim=-1).view(*x.shape[:2], -1), new_state


class ConvClassifier(nn.Module):
    """The seed's CNN: [B, 28, 28] -> 2 x (Conv 5x5 'same' + ReLU + MaxPool 2) -> Linear -> logits."""

    def __init__(self, channels: tuple[int, int] | list[int] = (16, 32), image_size: int = 28, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.args = dict(name="cnn", channels=[c1, c2], image_size=image_size, num_classes=num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4  # two 2x2 poolings
        self.head = nn.Linear(c2 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The data path yields [B, H, W] (rows or columns view); the convolutions want one channel.
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def chrono_init_(rnn: nn.Module, max_steps: int) -> None:
    """Chrono initialisation (Tallec & Ollivier, 2018) of an LSTM's or GRU's gate biases, in place.

    PyTorch's default init leaves the forget gate near 0.5, so a memory halves at every step and
    nothing survives the ~100 blank pixels (median) that end a digit in the pixel view: such a model
    sits at chance for epochs. Chrono draws each unit's time scale T from [1, max_steps - 1] and
    sets the LSTM forget bias to log(T) with the input bias at -log(T) (the GRU's update gate to
    log(T)), so units start out remembering for up to ``max_steps`` steps.
    """
    if not isinstance(rnn, (nn.LSTM, nn.GRU)):
        raise ValueError(f"chrono initialisation needs an LSTM or GRU, not {type(rnn).__name__}")
    h = rnn.hidden_size
    with torch.no_grad():
        for name, bias in rnn.named_parameters():
            if not name.startswith("bias_"):
                continue
            bias.zero_()
            if name.startswith("bias_hh"):
                continue  # the gates' biases add up (not the GRU's candidate, left at 0 anyway): all in bias_ih
            log_t = torch.empty(h).uniform_(1.0, max_steps - 1.0).log_()
            if isinstance(rnn, nn.LSTM):  # gates i, f, g, o
                bias[h : 2 * h] = log_t
                bias[:h] = -log_t
            else:  # gates r, z, n; h' = (1 - z) * n + z * h
                bias[h : 2 * h] = log_t


def classifier_args(cfg: Any, input_size: int = 28, num_classes: int = 10) -> dict:
    """The constructor arguments of the classifier ``cfg.model`` names; stored in checkpoints to rebuild the net.

    The recurrent classifier's dict has no ``name`` key (as before the CNN existed), so
    checkpoints written earlier still match and resume.
    """
    if str(cfg.name) == "cnn":
        return dict(name="cnn", channels=[16, 32], image_size=28, num_classes=num_classes)
    return dict(
        cell=str(cfg.cell),
        input_size=input_size,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_layers),
        dropout=float(cfg.dropout),
        bidirectional=bool(cfg.bidirectional),
        num_classes=num_classes,
    )


def tagger_args(cfg: Any, input_size: int, output_size: int) -> dict:
    """The constructor arguments of a per-step network (classes or values at every step) with ``cfg.model``'s stack."""
    return dict(
        name="tagger",
        cell=str(cfg.cell),
        input_size=input_size,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_layers),
        dropout=float(cfg.dropout),
        bidirectional=bool(cfg.bidirectional),
        output_size=output_size,
    )


def regressor_args(cfg: Any, input_size: int = 1, output_size: int = 1) -> dict:
    """The constructor arguments of a per-step regressor with ``cfg.model``'s recurrent stack."""
    return dict(
        name="regressor",
        cell=str(cfg.cell),
        input_size=input_size,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_layers),
        output_size=output_size,
    )


# The registry of architectures: a checkpoint's model_args["name"] (absent: "rnn") -> class.
# model.name chooses among the classifiers; a task may build another (the sine task: regressor).
CLASSIFIERS: dict[str, type[nn.Module]] = {"rnn": SequenceClassifier, "cnn": ConvClassifier}
ARCHITECTURES: dict[str, type[nn.Module]] = {
    **CLASSIFIERS,
    "regressor": SequenceRegressor,
    "tagger": SequenceTagger,
    "language_model": LanguageModel,
}


def build_model(args: dict) -> nn.Module:
    """Rebuild the network from its stored constructor arguments (``model_args``)."""
    args = dict(args)
    return ARCHITECTURES[args.pop("name", "rnn")](**args)


def initial_model(args: dict, seed: int, chrono: int = 0) -> nn.Module:
    """The network with its initial weights, identical on every rank (DDP also broadcasts them)."""
    torch.manual_seed(seed)
    model = build_model(args)
    if chrono:  # initial weights only: a resume loads the checkpoint's over them
        for rnn in model.modules():
            if isinstance(rnn, nn.RNNBase):
                chrono_init_(rnn, chrono)
    return model


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CUDA give cuDNN one flat weight buffer (the fused kernel, no per-call copy)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.enabled = True
        for rnn in model.modules():
            if isinstance(rnn, nn.RNNBase):
                rnn.flatten_parameters()
    return model
