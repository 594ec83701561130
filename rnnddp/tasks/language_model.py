"""language_model: predict the next token of one long stream, the hidden state carried from step to step.

The data is a folder made by ``rnnddp-prepare --text`` (its tokenizer and one token array per
split). Training cuts the train stream into ``train.global_batch_size`` stripes and takes
``lm.bptt`` tokens of each per step (rnnddp/data/streams.py: the layout, which rank owns which
stripes); every stripe's state is carried, detached, into the next step (rnnddp/train/carry.py)
and starts from zeros at each epoch. The checkpoint holds every stripe's state and the position,
so a resume on any number of ranks continues the same computation.

Validation and test run over their whole stream in ``lm.eval_stripes`` stripes with the state
carried: the loss in nats per token, reported as perplexity (words, subwords) or bits per
character (characters). ``best.pt`` is chosen on validation only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnddp.data.streams import StreamBatches, TextTokens, eval_chunks
from rnnddp.data.text import PreparedText, Tokenizer, TokenStream, encode_file, open_text
from rnnddp.errors import UserError
from rnnddp.export.graphs import Tensor
from rnnddp.metrics import Metric
from rnnddp.tasks.base import Serving, Splits, Task
from rnnddp.train.carry import CarriedState, block_rows, detach_state


@dataclass
class LanguageModelConfig:
    path: str = ""  # a folder made by rnnddp-prepare --text
    bptt: int = 64  # tokens of every stripe per optimiser step (truncated backpropagation through time)
    variable_bptt: bool = False  # AWD-LSTM: draw each step's length around bptt; the LR scaled by len / bptt
    random_offset: bool = False  # start each epoch's stripes at a random offset in [0, bptt)
    emb_size: int = 128  # the embedding (and, tied, the top layer's units)
    dropout_emb: float = 0.0  # locked dropout on the embedding (one mask per stripe and step)
    dropout_out: float = 0.0  # locked dropout on the top layer's output (model.dropout: between layers)
    tie_weights: bool = True  # the decoder's weight is the embedding's
    adaptive_cutoffs: list[int] = field(default_factory=list)  # non-empty: an adaptive softmax with these cutoffs
    eval_stripes: int = 10  # validation and test: the stream in this many stripes, the state carried
    # > 0: the embedding (a tied decoder with it) and an untied decoder's weight from uniform(-r, r), the decoder's
    # bias 0, as pytorch/examples and AWD-LSTM (0.1); 0: PyTorch's defaults (N(0, 1) embeddings)
    init_range: float = 0.0


def text_metric(tokenizer_kind: str) -> Metric:
    """Bits per character for characters, perplexity for words and subwords (lower is better)."""
    if tokenizer_kind == "char":
        return Metric("bpc", higher_is_better=False)
    return Metric("ppl", higher_is_better=False, log_scale=True)


def from_nats(loss: float, metric: str) -> float:
    """The metric's value for a mean loss in nats per token."""
    return loss / math.log(2) if metric == "bpc" else math.exp(min(loss, 700.0))


class LanguageModel(Task):
    name = "language_model"
    section = "lm"
    Section = LanguageModelConfig
    metric = Metric("ppl", higher_is_better=False, log_scale=True)  # bpc for characters (set per folder)
    cuda_graph_unsupported = "the language model's carried hidden state is an input that changes every step"
    # The folder may move: its tokenizer and splits are checked by their manifest (check_resume).
    RESUME_SAFE = ("lm.path",)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        s = cfg.lm
        if not s.path:
            raise UserError(
                "task=language_model needs lm.path=DIR, a folder made by rnnddp-prepare --text FILE --out DIR"
            )
        for key in ("bptt", "emb_size", "eval_stripes"):
            if getattr(s, key) <= 0:
                raise UserError(f"bad value for config key 'lm.{key}': must be > 0")
        for key in ("dropout_emb", "dropout_out"):
            if not 0 <= getattr(s, key) < 1:
                raise UserError(f"bad value for config key 'lm.{key}': must be in [0, 1)")
        if cfg.model.name != "rnn" or cfg.model.bidirectional:
            raise UserError(
                "task=language_model needs a causal recurrent model: model.name=rnn, model.bidirectional=false"
            )
        if s.adaptive_cutoffs and s.tie_weights:
            raise UserError(
                "lm.adaptive_cutoffs: an adaptive softmax has no single output matrix to tie to the embedding; "
                "set lm.tie_weights=false"
            )
        if s.init_range < 0:
            raise UserError("bad value for config key 'lm.init_range': must be >= 0 (0: PyTorch's defaults)")
        if s.variable_bptt and s.bptt < 10:
            raise UserError("lm.variable_bptt draws lengths around lm.bptt with sd 5: set lm.bptt >= 10")

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        # A run with its checkpoint needs no data folder to generate: the tokenizer is in the checkpoint.
        self.data: PreparedText | None = None
        self.tokenizer: Tokenizer | None = None
        # A missing folder is reported when the data is first needed (model_args, load).
        if Path(cfg.lm.path).exists():
            self._folder()
        self.carried = CarriedState(info, cfg.train.global_batch_size, block_rows)

    # -- data ---------------------------------------------------------------------------------
    def _folder(self) -> PreparedText:
        if self.data is None:
            self.data = open_text(Path(self.cfg.lm.path))  # raises the one-line error naming the fix
            self.tokenizer = self.data.tokenizer
            self.metric = text_metric(self.tokenizer.kind)
        return self.data

    def load(self) -> Splits:
        d = self._folder()
        splits = Splits(d.split("train"), d.split("val"), d.split("test"))
        stripes = self.settings.eval_stripes
        for name, split in (("val", splits.val), ("test", splits.test)):
            if split is not None and len(split) < 2 * stripes:  # each stripe must predict at least one token
                raise UserError(
                    f"{self.settings.path}'s {name} split holds {len(split)} tokens, too few for lm.eval_stripes="
                    f"{stripes} stripes of two tokens; set lm.eval_stripes= lower or give more text"
                )
        return splits

    def train_batches(self, split: TokenStream) -> StreamBatches:
        s = self.settings
        return StreamBatches(
            split.tokens,
            global_batch_size=self.cfg.train.global_batch_size,
            bptt=s.bptt,
            rank=self.info.rank,
            world_size=self.info.world_size,
            seed=self.cfg.seed,
            variable_bptt=s.variable_bptt,
            random_offset=s.random_offset,
            device=self.info.device,
            name=f"{s.path}'s train split",
        )

    def text_split(self, path: Path) -> TextTokens:
        """Any text file in the model's tokens (``rnnddp-evaluate --text``)."""
        if self.tokenizer is None:
            raise UserError(f"lm.path={self.cfg.lm.path}: no tokenizer known; evaluate a checkpoint of this rnnddp")
        tokens = encode_file(Path(path), self.tokenizer)
        if len(tokens) < 2 * self.settings.eval_stripes:
            raise UserError(
                f"{path}: {len(tokens)} tokens, too few for lm.eval_stripes={self.settings.eval_stripes} stripes "
                "of two tokens; give more text or set lm.eval_stripes= lower"
            )
        return TextTokens(tokens)

    # -- model ----------------------------------------------------------------------------------
    def model_args(self) -> dict:
        if self.tokenizer is None:
            self._folder()
        m, s = self.cfg.model, self.settings
        vocab = self.tokenizer.vocab_size
        cutoffs = [int(c) for c in s.adaptive_cutoffs]
        if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] <= 0 or cutoffs[-1] >= vocab):
            raise UserError(
                f"lm.adaptive_cutoffs={cutoffs}: must rise strictly between 0 and the vocabulary size {vocab}"
            )
        return dict(
            name="language_model",
            cell=str(m.cell),
            vocab_size=vocab,
            emb_size=int(s.emb_size),
            hidden_size=int(m.hidden_size),
            num_layers=int(m.num_layers),
            dropout=float(m.dropout),
            dropout_emb=float(s.dropout_emb),
            dropout_out=float(s.dropout_out),
            tie_weights=bool(s.tie_weights),
            adaptive_cutoffs=cutoffs,
        )

    def init_weights(self, module: nn.Module) -> None:
        r = float(self.settings.init_range)
        if r > 0:
            module.init_uniform_(r)

    def check_restorable(self, saved_args: dict, path: Path) -> None:
        if self.tokenizer is not None and saved_args.get("vocab_size") != self.tokenizer.vocab_size:
            raise UserError(
                f"checkpoint {path} has a vocabulary of {saved_args.get('vocab_size')} tokens, lm.path="
                f"{self.cfg.lm.path} has {self.tokenizer.vocab_size}; point lm.path at the folder it was trained on"
            )

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        state = None if batch.new_epoch else self.carried.state
        with autocast:
            nll, state = model(batch.inputs, state, batch.targets)
        self.carried.keep(state)  # truncated BPTT: detached, no gradient into earlier steps
        return nll.float().mean()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, module: nn.Module, split: TokenStream, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """The mean loss over the whole stream in ``lm.eval_stripes`` stripes, the state carried."""
        device = self.info.device
        was_training = module.training
        module.eval()
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        state = None
        for x, y in eval_chunks(split.tokens, self.settings.eval_stripes, self.settings.bptt):
            with autocast:
                nll, state = module(x.to(device), state, y.to(device))
            state = detach_state(state)
            total += nll.double().sum()
            count += y.numel()
        module.train(was_training)
        loss = total.item() / max(count, 1)
        name = self.metric.name
        return {"loss": loss, name: from_nats(loss, name), "samples": count, "tokens": count}

    def report(self, result: dict[str, Any], split: Any) -> list[str]:
        name = self.metric.name
        what = "bits per character" if name == "bpc" else "perplexity"
        return [
            f"{result.get('source', 'test')} loss {result['loss']:.4f} nats/token  {what} {result[name]:.4f}  ({result['tokens']} tokens "
            f"predicted, {self.settings.eval_stripes} stripes, the state carried)"
        ]

    def describe(self) -> str:
        m = self.cfg.model
        tok = self.tokenizer
        vocab = f", {tok.kind} tokens ({tok.vocab_size})" if tok is not None else ""
        return f"{m.cell}-{m.hidden_size}x{m.num_layers} language model{vocab}"

    # -- checkpoint -----------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        m = self._folder().manifest
        return {"tokenizer": m["tokenizer"], "splits": {k: v["tokens"] for k, v in m["splits"].items()}}

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        super().check_resume(state, path)
        saved = state.get("text_manifest")
        if saved is not None and saved != self._fingerprint():
            raise UserError(
                f"checkpoint {path} was trained on another prepared text (its tokenizer or splits differ from "
                f"{self.cfg.lm.path}); point lm.path at that folder or start a new run with another name="
            )

    def state_dict(self) -> dict[str, Any]:
        # Every stripe's state (gathered), the tokenizer (generation needs no data folder), the data's identity.
        return {
            **self.carried.state_dict(),
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer is not None else None,
            "text_manifest": self._fingerprint() if self.data is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried.load_state_dict(state)
        if self.tokenizer is None and state.get("tokenizer"):
            self.tokenizer = Tokenizer.from_dict(state["tokenizer"])
            self.metric = text_metric(self.tokenizer.kind)

    def predict(self, module: nn.Module, files: list[str], path: Path) -> list[str]:
        raise UserError(f"{path} is a language model; continue a text with rnnddp-generate {path} --prompt TEXT")

    def serving(self) -> Serving:
        tok = self.tokenizer
        if tok is None:
            raise UserError("the checkpoint holds no tokenizer; export a checkpoint this rnnddp wrote")
        tokens = Tensor("tokens", "int64", ["batch", "time"], f"token ids of the {tok.kind} tokenizer", tok.vocab_size)
        return Serving(
            nn.Identity(), tokens, lengths=False, meta={"tokenizer": tok.to_dict(), "metric": self.metric.name}
        )


def next_token_distribution(logp: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Sampling probabilities from log-probabilities [V] (temperature > 0; ``top_k`` > 0 keeps the k best)."""
    logits = logp.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, -math.inf), logits)
    return torch.softmax(logits, dim=-1)
