"""Training speed of the language model: rnnddp's step against the pytorch/examples recipe, a model-only ceiling and DDP.

    python -m bench.language_model                      # every part: 2-3 minutes on 2 idle CPU cores
    python -m bench.language_model --quick              # smoke test: hidden 256, few steps, well under a minute
    python -m bench.language_model --skip ddp2 --steps 10 --hidden 256
    python -m bench.language_model --device cuda --precision bf16

Every part trains the same network on the same data: rnnddp.models.LanguageModel as
configs/shakespeare_char.yaml builds it (LSTM, embedding 64 -> hidden 512, one layer, untied decoder,
locked dropout 0.1 on the output), with the job's initial weights, on tiny-shakespeare prepared with
the char tokenizer (rnnddp.data.text.prepare_text) into a temporary folder, 64 stripes of bptt 128
tokens per step, the state carried from step to step. Figures are tokens per second of training.

  recipe      pytorch/examples word_language_model/main.py's train() written out: batchify the train
              tokens into [L, B] columns on the device, get_batch(i) slices of bptt rows,
              repackage_hidden, model.zero_grad, loss = criterion(output.view(-1, ntokens), targets)
              (log-probabilities + NLLLoss, the example's model and criterion), backward,
              clip_grad_norm_, and total_loss += loss.item(). Two departures, both to compare like with
              like: the optimiser is the job's (rnnddp.train.optim.build_optimizer: AdamW from the
              config, fused) instead of the example's hand-written SGD update, and the precision rule is
              the job's (autocast and loss scaling from rnnddp.train.precision; none in fp32). The network
              is rnnddp's own LanguageModel behind the example's RNNModel interface ([T, B] in,
              [T*B, V] log-probabilities out, init_hidden), so both sides run the very same module.
  rnnddp      the job's own step, built by rnnddp.job.build_trainer (StreamBatches over the memory-mapped
              split, task.loss with the carried state, TrainStep: clipping, scaler; the LR schedule's
              step), stepping trainer.train_step over its batches
  ceiling     forward + backward + clipping + the optimiser step, same model, optimiser and precision, on
              16 consecutive batches already as contiguous tensors on the device, state carried
  ddp2        train_ddp.py under torchrun, 2 ranks x 1 thread against 1 rank x 1 thread, same global batch
              (train/tokens_per_s from metrics.jsonl)
  cuda_graph  (CUDA) the job's step with train.cuda_graph=true; when the job refuses the language model
              (rnnddp.train.cuda_graph.unsupported_reason) the refusal is reported, nothing is timed

The harness (bench/harness.py) times the in-process parts in interleaved rounds and reports the
median round, with how many cores other processes kept busy meanwhile. On a shared 2-core machine
that figure matters: with 2 torch threads, another process on one core made this LSTM step 5-12x
slower (the threads wait on each other), so a flagged figure there says little; ``--threads 1``
gives figures that such load barely moves. The process flushes
denormals to zero as the job does (train.flush_denormals), so the recipe runs with it too.
Printed, not asserted; the JSON goes to bench_results/language_model.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.harness import (
    DISTURBED_CORES,
    StepFn,
    environment,
    fmt_load,
    fmt_rate,
    forever,
    guarded,
    measure_interleaved,
    one_and_two_ranks,
    ratio,
)
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config
from rnnddp.dist import DistInfo, configure_cuda, flush_denormals
from rnnddp.errors import UserError
from rnnddp.job import build_trainer
from rnnddp.launch import REPO
from rnnddp.models import initial_model, place
from rnnddp.tasks import TASKS, Task
from rnnddp.train import cuda_graph
from rnnddp.train.carry import detach_state
from rnnddp.train.optim import build_optimizer
from rnnddp.train.precision import resolve_precision
from rnnddp.train.trainer import Trainer

CONFIG = REPO / "configs" / "shakespeare_char.yaml"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"
DEFAULT_OUT = REPO / "bench_results" / "language_model.json"  # bench_results/ is git-ignored
PARTS = ("recipe", "rnnddp", "ceiling", "ddp2", "cuda_graph")
IN_PROCESS = ("recipe", "rnnddp", "ceiling", "cuda_graph")


@dataclass
class Settings:
    text: Path
    device: torch.device
    precision: str  # effective precision of the in-process parts (fp32 on CPU)
    hidden: int
    stripes: int  # train.global_batch_size: the stripes of every step
    bptt: int
    steps: int  # timed steps per round (in-process parts)
    warmup: int  # untimed steps before the first round
    rounds: int
    threads: int | None  # torch threads of the in-process parts (None: torch's default)
    ddp_steps: int
    extra: tuple[str, ...]  # --set: config overrides for every part (e.g. lm.dropout_out=0)
    skip: frozenset[str]
    quick: bool
    out: Path


# -- the job's config and data ------------------------------------------------------------------
def overrides(s: Settings, prepared: Path) -> list[str]:
    """configs/shakespeare_char.yaml with this run's size, data folder and precision (no W&B, no resume)."""
    return [
        "--config",
        str(CONFIG),
        f"lm.path={prepared}",
        f"model.hidden_size={s.hidden}",
        f"train.global_batch_size={s.stripes}",
        f"lm.bptt={s.bptt}",
        f"train.precision={s.precision}",
        "wandb.mode=disabled",
        "resume=none",
        *s.extra,
    ]


def job_config(s: Settings, prepared: Path, run_dir: Path, *more: str) -> Any:
    return load_config([*overrides(s, prepared), f"run_dir={run_dir}", *more])


def prepare(s: Settings, tmp: Path) -> Path:
    """The text tokenized by characters into a prepared folder (what rnnddp-prepare --text writes)."""
    from rnnddp.data.text import prepare_text

    return prepare_text(s.text, tmp / "prepared", tokenizer="char")


# -- a. the pytorch/examples recipe -------------------------------------------------------------
class RNNModel(nn.Module):
    """The example's RNNModel interface over rnnddp's LanguageModel (the very same network and weights).

    [T, B] tokens and a hidden state in, ([T * B, V] log-probabilities, new hidden state) out, as
    word_language_model/model.py's forward returns them; ``init_hidden(bsz)`` gives zeros.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.ntoken = lm.args["vocab_size"]
        self.rnn_type = lm.args["cell"]

    def forward(self, input: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        output, hidden = self.lm(input.t(), list(hidden))  # rnnddp's model is batch-first: [B, T, V]
        return output.transpose(0, 1).reshape(-1, self.ntoken), hidden

    def init_hidden(self, bsz: int) -> list:
        weight = next(self.parameters())
        zeros = [weight.new_zeros(1, bsz, layer.hidden_size) for layer in self.lm.layers]
        return [(z, z.clone()) if self.rnn_type == "lstm" else z for z in zeros]


def batchify(data: torch.Tensor, bsz: int, device: torch.device) -> torch.Tensor:
    # Work out how cleanly we can divide the dataset into bsz parts.
    nbatch = data.size(0) // bsz
    # Trim off any extra elements that wouldn't cleanly fit (remainders).
    data = data.narrow(0, 0, nbatch * bsz)
    # Evenly divide the data across the bsz batches.
    data = data.view(bsz, -1).t().contiguous()
    return data.to(device)


def repackage_hidden(h: Any) -> Any:
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


class RecipeLoop:
    """word_language_model/main.py's ``train()``, one optimiser step per call (epochs chained)."""

    def __init__(self, s: Settings, cfg: Any, task: Task) -> None:
        self.device = s.device
        self.bptt = cfg.lm.bptt
        self.batch_size = cfg.train.global_batch_size
        self.clip = cfg.train.grad_clip
        # corpus.train: the whole train split as one LongTensor of token ids.
        corpus_train = torch.from_numpy(np.asarray(task.load().train.tokens, dtype=np.int64))
        self.train_data = batchify(corpus_train, self.batch_size, s.device)
        self.model = RNNModel(place(initial_model(task.model_args(), cfg.seed, cfg.model.chrono_init), s.device))
        self.ntokens = self.model.ntoken
        self.criterion = nn.NLLLoss()
        self.optimizer = build_optimizer(self.model.lm, cfg.optim)  # the job's AdamW (see the docstring)
        precision = resolve_precision(cfg.train.precision, s.device)
        self.autocast, self.scaler = precision.autocast(), precision.grad_scaler()
        self.loss: torch.Tensor | None = None  # the last step's (tests compare it with rnnddp's)
        self._steps = forever(lambda _epoch: self.train())

    def get_batch(self, source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = min(self.bptt, len(source) - 1 - i)
        data = source[i : i + seq_len]
        target = source[i + 1 : i + 1 + seq_len].view(-1)
        return data, target

    def train(self) -> Iterator[int]:
        # Turn on training mode which enables dropout.
        self.model.train()
        total_loss = 0.0
        hidden = self.model.init_hidden(self.batch_size)
        for _batch, i in enumerate(range(0, self.train_data.size(0) - 1, self.bptt)):
            data, targets = self.get_batch(self.train_data, i)
            # Starting each batch, we detach the hidden state from how it was previously produced.
            # If we didn't, the model would try backpropagating all the way to start of the dataset.
            self.model.zero_grad()
            hidden = repackage_hidden(hidden)
            with self.autocast:
                output, hidden = self.model(data, hidden)
                loss = self.criterion(output.view(-1, self.ntokens), targets)
            self.scaler.scale(loss).backward()
            # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
            if self.clip > 0:  # the example always clips (--clip 0.25); train.grad_clip=0 means no clipping
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.item()  # the example's running loss for its log line (a host sync)
            self.loss = loss.detach()
            yield data.numel()

    def __call__(self) -> int:
        return next(self._steps)


# -- b. rnnddp's own path -----------------------------------------------------------------------
def build_rnnddp(s: Settings, prepared: Path, run_dir: Path, *more: str) -> Trainer:
    """A single-process Trainer set up exactly as the job sets it up (rnnddp.job.build_trainer)."""
    cfg = job_config(s, prepared, run_dir, *more)
    built = build_trainer(cfg, DistInfo(device=s.device), CheckpointManager(run_dir, writer=False))
    built.trainer.module.train()
    return built.trainer


class RnnddpLoop:
    """trainer.train_step over the trainer's own batches (the job's per-step code), epochs chained."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.stream = forever(trainer.batches.epoch)
        self.loss: torch.Tensor | None = None

    def __call__(self) -> int:
        batch = next(self.stream)
        self.loss = self.trainer.train_step(batch)
        return batch.inputs.numel()


# -- c. model-only ceiling ----------------------------------------------------------------------
class CeilingLoop:
    """Forward, backward, clipping and the optimiser step on 16 consecutive batches made before timing.

    The model, initial weights, optimiser (fused AdamW), clipping and precision rule (autocast, loss
    scaling) are the job's; the batches are contiguous tensors on the device; the state is carried
    (detached) from one step to the next, also from the 16th batch back to the first.
    """

    def __init__(self, s: Settings, cfg: Any, task: Task) -> None:
        self.model = place(initial_model(task.model_args(), cfg.seed, cfg.model.chrono_init), s.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        precision = resolve_precision(cfg.train.precision, s.device)
        self.autocast, self.scaler = precision.autocast(), precision.grad_scaler()
        self.clip = cfg.train.grad_clip
        batches = task.train_batches(task.load().train)
        stream = batches.epoch(0)
        pool = [next(stream) for _ in range(min(16, batches.steps_per_epoch))]
        self.pool = [(b.inputs.contiguous().to(s.device), b.targets.contiguous().to(s.device)) for b in pool]
        self.k = 0
        self.state: Any = None
        self.loss: torch.Tensor | None = None

    def __call__(self) -> int:
        x, y = self.pool[self.k % len(self.pool)]
        self.k += 1
        with self.autocast:
            nll, state = self.model(x, self.state, y)
        self.state = detach_state(state)
        loss = nll.mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss = loss.detach()
        return x.numel()


# -- d. DDP in subprocesses ---------------------------------------------------------------------
def ddp_part(s: Settings, tmp: Path, prepared: Path, steps_per_epoch: int) -> dict[str, Any]:
    """2 ranks x 1 thread against 1 rank x 1 thread, same global batch, from the job's own windows."""
    # Stay inside epoch 0: an epoch end validates and saves, which the next window would include.
    steps = min(s.ddp_steps, steps_per_epoch)
    log_every = max(2, min(50, steps // 8))
    args = [
        *overrides(s, prepared),
        f"train.max_steps={steps}",
        f"train.log_every_steps={log_every}",
        "eval.every_steps=0",
        "eval.plots=false",
        "checkpoint.every_steps=0",
    ]
    out: dict[str, Any] = {"steps": steps, "log_every_steps": log_every, "threads_per_rank": 1}
    out.update(one_and_two_ranks(args, tmp, "tokens_per_s"))
    return out


# -- report -------------------------------------------------------------------------------------
def as_tokens(measured: dict[str, Any]) -> dict[str, Any]:
    """The harness counts "samples": here every sample is a token."""
    return {
        "tokens_per_s": measured["samples_per_s"],
        "rounds_tokens_per_s": measured["rounds_samples_per_s"],
        "steps_per_round": measured["steps_per_round"],
        "foreign_cores": measured["foreign_cores"],
        "disturbed": any((c or 0) > DISTURBED_CORES for c in measured["foreign_cores"]),
    }


def table_rows(parts: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name in PARTS:
        p = parts.get(name)
        if p is None:
            continue
        if "skipped" in p:
            rows.append((name, "skipped", p["skipped"]))
        elif "unsupported" in p:
            rows.append((name, "unsupported", p["unsupported"]))
        elif "failed" in p:
            rows.append((name, "failed", p["failed"].splitlines()[-1][:100]))
        elif name == "ddp2":
            for label, title in (("one_rank", "ddp2: 1 rank x 1 thread"), ("two_ranks", "ddp2: 2 ranks x 1 thread")):
                e = p[label]
                if e.get("tokens_per_s") is None:
                    rows.append((title, "failed", e.get("error", "").splitlines()[0][:100]))
                    continue
                detail = (
                    f"median of {len(e['windows_tokens_per_s'])} windows of {p['log_every_steps']} steps "
                    f"(cv {e['window_cv']:.0%}), {p['steps']} steps; {fmt_load(e['foreign_cores'])}"
                )
                rows.append((title, fmt_rate(e["tokens_per_s"]), detail))
        else:
            r = p["rounds_tokens_per_s"]
            detail = (
                f"median of {len(r)} x {p['steps_per_round']} steps (range {min(r):,.0f}-{max(r):,.0f}); "
                f"{fmt_load(p['foreign_cores'])}"
            )
            rows.append((name, fmt_rate(p["tokens_per_s"]), detail))
    return rows


def headline(parts: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def rate(name: str) -> float | None:
        return parts.get(name, {}).get("tokens_per_s")

    ddp = parts.get("ddp2", {})
    return {
        "rnnddp/recipe": ratio(rate("rnnddp"), rate("recipe")),
        "rnnddp/ceiling": ratio(rate("rnnddp"), rate("ceiling")),
        "recipe/ceiling": ratio(rate("recipe"), rate("ceiling")),
        "cuda_graph/rnnddp": ratio(rate("cuda_graph"), rate("rnnddp")),
        "ddp2/one_rank": ddp.get("speedup_over_one_rank"),
        "ddp2_scaling_efficiency": ddp.get("scaling_efficiency"),
    }


GOALS = {"rnnddp/recipe": 1.0, "rnnddp/ceiling": 0.9}


def print_report(parts: dict[str, dict[str, Any]], head: dict[str, Any]) -> None:
    rows = table_rows(parts)
    width = max(len(r[0]) for r in rows) if rows else 10
    print()
    print(f"{'part':<{width}}  {'tokens/s':>11}  detail")
    print(f"{'-' * width}  {'-' * 11}  {'-' * 40}")
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:>11}  {detail}")
    print()
    labels = {
        "rnnddp/recipe": "rnnddp / recipe",
        "rnnddp/ceiling": "rnnddp / ceiling",
        "recipe/ceiling": "recipe / ceiling",
        "cuda_graph/rnnddp": "cuda_graph / rnnddp",
        "ddp2/one_rank": "ddp2 / 1 rank",
        "ddp2_scaling_efficiency": "ddp2 scaling efficiency",
    }
    for key, label in labels.items():
        value = head.get(key)
        shown = "-" if value is None else (f"{value:.0%}" if key == "ddp2_scaling_efficiency" else f"{value:.2f}x")
        goal = f"   (goal >= {GOALS[key]:.1f}x)" if key in GOALS else ""
        print(f"  {label:<24} {shown}{goal}")
    disturbed = [name for name, p in parts.items() if p.get("disturbed")]
    if disturbed:
        print(f"  note: other processes were busy during {', '.join(disturbed)}; those figures are noisy")


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.language_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="a text file, prepared with the char tokenizer")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--hidden", type=int, help="LSTM hidden size (default 512; --quick: 256)")
    p.add_argument("--stripes", type=int, default=64, help="stripes per step (train.global_batch_size)")
    p.add_argument("--bptt", type=int, default=128, help="tokens of every stripe per step (lm.bptt)")
    p.add_argument("--steps", type=int, help="timed steps per round of the in-process parts")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (median reported)")
    p.add_argument(
        "--threads", type=int, help="torch threads of the in-process parts (default: torch's; 1 on a busy machine)"
    )
    p.add_argument("--ddp-steps", type=int, help="optimiser steps of each ddp2 run (capped at one epoch)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="CUDA only")
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every part")
    p.add_argument("--quick", action="store_true", help="hidden 256, few steps: a smoke test")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    a = p.parse_args(argv)

    skip = frozenset(x.strip() for x in a.skip.split(",") if x.strip())
    if unknown := skip - set(PARTS):
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    for flag in ("hidden", "stripes", "bptt", "steps", "rounds", "threads", "ddp_steps"):
        value = getattr(a, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if a.stripes % 2:
        p.error("--stripes must be even (ddp2 splits them over 2 ranks)")
    text = Path(a.text).expanduser()
    if not text.is_file():
        p.error(f"--text {text}: no such file")
    cuda = device.type == "cuda"
    if not cuda and a.precision != "fp32":
        print(f"note: --precision {a.precision} applies on CUDA only; the CPU parts run in fp32", file=sys.stderr)
    # A CPU step at the defaults (LSTM-512, 64 x 128 tokens) takes ~0.45 s on 2 idle cores (~0.9 s on
    # one): a few steps a round keep the in-process parts under a minute and each ddp2 run near 45 s.
    # Short rounds, more of them: a burst of load from another process then spoils fewer of them.
    steps = a.steps or ((20 if a.quick else 200) if cuda else (2 if a.quick else 3))
    return Settings(
        text=text,
        device=device,
        precision=a.precision if cuda else "fp32",
        hidden=a.hidden or (256 if a.quick else 512),
        stripes=a.stripes,
        bptt=a.bptt,
        steps=steps,
        warmup=max(1 if a.quick else 2, steps // 10),
        rounds=a.rounds or (2 if a.quick else 5),
        threads=a.threads,
        ddp_steps=a.ddp_steps or (12 if a.quick else 40),
        extra=tuple(a.set),
        skip=skip,
        quick=a.quick,
        out=Path(a.out),
    )


def run(s: Settings, env: dict[str, Any]) -> dict[str, Any]:
    """Every part not skipped; the results as written to JSON."""
    cuda = s.device.type == "cuda"
    parts: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {name: "--skip" for name in s.skip}
    if not cuda:
        skipped.setdefault("cuda_graph", "needs CUDA")
    elif torch.cuda.device_count() < 2:
        skipped.setdefault("ddp2", "needs 2 GPUs on CUDA")

    with tempfile.TemporaryDirectory(prefix="rnnddp_bench_lm_") as tmp_name:
        tmp = Path(tmp_name)
        prepared = prepare(s, tmp)
        cfg = job_config(s, prepared, tmp / "cfg")
        if cuda:  # the job's cuDNN and TF32 settings (build_trainer's), for every part alike
            configure_cuda(cfg.train.tf32)
        task = TASKS[cfg.task](cfg, DistInfo(device=s.device))
        steps_per_epoch = task.train_batches(task.load().train).steps_per_epoch
        print(
            f"model {task.describe()}, emb {cfg.lm.emb_size}, {'tied' if cfg.lm.tie_weights else 'untied'}; "
            f"{s.stripes} stripes x bptt {s.bptt} = {s.stripes * s.bptt:,} tokens/step, {steps_per_epoch} steps/epoch; "
            f"precision {s.precision}; AdamW lr {cfg.optim.lr}, grad_clip {cfg.train.grad_clip}"
        )
        if "cuda_graph" not in skipped:
            why = cuda_graph.unsupported_reason(
                s.device, False, task.cuda_graph_unsupported, cfg.optim, cfg.model, cfg.debug.nonfinite_from_step
            )
            if why:  # the job would log a warning and train without graphs: nothing to time
                parts["cuda_graph"] = {"tokens_per_s": None, "unsupported": f"train.cuda_graph refused: {why}"}
                skipped["cuda_graph"] = "unsupported"

        builders: dict[str, Callable[[], StepFn]] = {
            "recipe": lambda: RecipeLoop(s, cfg, task),
            "rnnddp": lambda: RnnddpLoop(build_rnnddp(s, prepared, tmp / "rnnddp")),
            "ceiling": lambda: CeilingLoop(s, cfg, task),
            "cuda_graph": lambda: RnnddpLoop(build_rnnddp(s, prepared, tmp / "graph", "train.cuda_graph=true")),
        }
        step_fns: dict[str, StepFn] = {}
        for name, build in builders.items():
            if name in skipped:
                continue
            try:
                step_fns[name] = build()
            except Exception as e:  # as in guarded(): record the failure, run the rest
                traceback.print_exc()
                parts[name] = {"tokens_per_s": None, "failed": f"{type(e).__name__}: {e}"}
        if step_fns:
            print(
                f"[bench] {', '.join(step_fns)}: {s.warmup} warm-up steps, then {s.rounds} rounds x {s.steps} steps ...",
                file=sys.stderr,
                flush=True,
            )
            measured = guarded(
                "in-process parts",
                lambda: {"parts": measure_interleaved(step_fns, s.device, s.steps, s.rounds, s.warmup)},
            )
            for name in step_fns:
                if "parts" in measured:
                    parts[name] = as_tokens(measured["parts"][name])
                else:
                    parts[name] = {"tokens_per_s": None, "failed": measured["failed"]}
        if "ddp2" not in skipped:
            parts["ddp2"] = guarded("ddp2", lambda: ddp_part(s, tmp, prepared, steps_per_epoch))
    for name, why in skipped.items():
        parts.setdefault(name, {"skipped": why})
    settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in asdict(s).items()}
    settings["skip"] = sorted(s.skip)
    return {"environment": env, "settings": settings, "parts": parts, "headline": headline(parts)}


def main(argv: list[str]) -> int:
    s = parse_args(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    try:  # before any tensor work, as the job
        flush_denormals(load_config(["--config", str(CONFIG), *s.extra]).train.flush_denormals)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    env = environment(s.device)
    print(
        f"torch {env['torch']} | {env['device']}: {env['device_name']} | CPUs {env['cpu_count']} "
        f"(usable {env['cpus_usable']}) | torch threads {env['torch_threads']} | {env['date']}"
    )
    try:
        results = run(s, env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(results["parts"], results["headline"])
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
