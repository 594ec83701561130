"""Prepare your own data for training: sequences (``.ts`` (UEA/UCR) or ``.npz`` files) or text -> one folder.

    rnnddp-prepare --train TRAIN.ts --test TEST.ts --out data/mine        # validation carved from train
    rnnddp-prepare --train a.npz --val b.npz --test c.npz --out data/mine
    rnnddp-prepare --text input.txt --tokenizer char --out data/shakespeare    # val, test: the last 10%
    rnnddp-prepare --text train.txt --val valid.txt --test test.txt --tokenizer {char,word,bpe} [--vocab-size N] --out DIR
    python -m rnnddp.prepare --help

Text (``--text``, UTF-8): tokens of a character, word (PTB's ``<eos>``/``<unk>``) or byte-level BPE tokenizer,
memory-mapped per split; without ``--val``/``--test`` the last 10% of the file becomes validation and
test (5% each, in order, cut after a newline). ``rnnddp.data.text`` has the details.

Targets: a class per sequence (``.ts``, or ``.npz`` ``y`` of ``[N]``), or per-step targets
(``.npz``): a class at every step (integers or strings) or values at every step (floats).

Without ``--val`` a validation split (``--val-fraction`` of train) is drawn with a fixed seed:
stratified for a class per sequence (at least one sequence of each class that has two or more),
a plain draw of sequences for per-step targets. Normalisation
statistics come from the train split alone, from its real values only. The folder is written under
a temporary name and renamed when complete: a failure or a kill leaves no half-written ``--out``.

Missing values (``?`` in a ``.ts`` under ``@missing true``; NaN or infinity in a ``.ts`` or in an
``.npz``'s ``x``): those after a sequence's last real value (in every channel) shorten it, as the
UEA archive writes unequal lengths; those inside a sequence (a gap followed by a real value in its channel, or the
tail of a channel that ends before another) are refused, naming the file and line (``.ts``) or record
(``.npz``), unless ``--fill-missing`` fills them: ``zero`` with 0.0, ``previous`` with the channel's
last real value before the gap (a gap at the start: the first real value after it). Filled values
do not count in the statistics. A sequence with no real value is refused.

Exit codes: 0 written, 2 bad input (one line naming the file and the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rnnddp.data.readers import FILL_MISSING, FillMissing, Sequences, read_sequences
from rnnddp.data.sequences import TARGET_KINDS, SplitArrays, open_prepared, pack, write_prepared
from rnnddp.data.text import TOKENIZERS, open_text, prepare_text
from rnnddp.errors import UserError

VAL_SEED = 20260601  # the same draw every time: one validation split per data set


def stratified_split(labels: list[str], fraction: float, seed: int = VAL_SEED) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): ``fraction`` of each class to validation, by a seeded draw."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for name in sorted(set(labels)):
        idx = np.array([i for i, label in enumerate(labels) if label == name])
        rng.shuffle(idx)
        # Every class on both sides when it can be.
        k = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1) if len(idx) >= 2 else 0
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def _subset(s: Sequences, idx: list[int]) -> Sequences:
    return Sequences(
        s.path,
        [s.features[i] for i in idx],
        [s.labels[i] for i in idx] if s.labels else [],
        [s.steps[i] for i in idx] if s.steps else [],
        s.step_values,
        s.class_names,
        [s.filled[i] for i in idx] if s.filled else [],
    )


def prepare(
    train: Path,
    test: Path,
    out: Path,
    val: Path | None = None,
    val_fraction: float = 0.2,
    fill_missing: FillMissing | None = None,
) -> Path:
    """Read, check and write; returns ``out``. ``fill_missing``: ``zero`` or ``previous`` fills missing
    values inside sequences (None refuses them; the module's docstring has the rule)."""
    if not 0 < val_fraction < 1 and val is None:
        raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1 (or give --val FILE)")
    parts = {"train": read_sequences(train, fill_missing), "test": read_sequences(test, fill_missing)}
    if val is not None:
        parts["val"] = read_sequences(val, fill_missing)
    tr = parts["train"]
    for s in parts.values():
        if s.feature_count != tr.feature_count:
            raise UserError(
                f"{s.path}: {s.feature_count} features per step, but the train file {tr.path} has "
                f"{tr.feature_count}; give splits of the same data set"
            )
        if s.target_kind != tr.target_kind:
            raise UserError(
                f"{s.path}: its targets are {TARGET_KINDS[s.target_kind]}, the train file {tr.path} has "
                f"{TARGET_KINDS[tr.target_kind]}; "
                "give every split the same kind of target"
            )
        if s.step_values and s.steps[0].shape[1] != tr.steps[0].shape[1]:
            raise UserError(
                f"{s.path}: {s.steps[0].shape[1]} values per step, the train file {tr.path} has {tr.steps[0].shape[1]}"
            )
    names: list[str] = []
    if not tr.step_values:
        train_labels = set(np.unique(np.concatenate(tr.steps))) if tr.per_step else set(tr.labels)
        names = (tr.class_names if not tr.per_step else []) or sorted(train_labels, key=_label_key)
        unseen: set[str] = set()
        for s in parts.values():
            unseen |= (set(np.unique(np.concatenate(s.steps))) if s.per_step else set(s.labels)) - train_labels
        if unseen:
            where = next(s.path for s in parts.values() if s is not tr)
            raise UserError(
                f"{where}: class(es) {', '.join(sorted(map(str, unseen), key=_label_key))} never occur in the "
                f"train file {tr.path}; a model cannot learn them: add examples to train or drop them"
            )
    if "val" not in parts:
        if tr.per_step:
            rng = np.random.default_rng(VAL_SEED)
            order = rng.permutation(len(tr.features))
            k = max(1, int(round(val_fraction * len(order))))
            tr_idx, val_idx = sorted(order[k:].tolist()), sorted(order[:k].tolist())
        else:
            tr_idx, val_idx = stratified_split(tr.labels, val_fraction)
        if not val_idx or not tr_idx:
            raise UserError(
                f"{tr.path}: too few sequences ({len(tr.features)}) to carve a validation split; give --val"
            )
        parts["val"] = _subset(tr, val_idx)
        parts["train"] = _subset(tr, tr_idx)
    arrays: dict[str, SplitArrays] = {}
    for name in ("train", "val", "test"):
        s = parts[name]
        if s.step_values:
            arrays[name] = pack(s.features, None, s.steps)
        elif s.per_step:
            index = np.array(names)
            order = np.argsort(index)  # names are in _label_key order; searchsorted needs them sorted
            arrays[name] = pack(s.features, None, [order[np.searchsorted(index, t, sorter=order)] for t in s.steps])
        else:
            index = {n: i for i, n in enumerate(names)}
            arrays[name] = pack(s.features, np.array([index[label] for label in s.labels], dtype=np.int64), None)
    source: dict[str, object] = {
        "train": str(train),
        "test": str(test),
        "val": str(val) if val else f"{val_fraction} of train",
    }
    if fill_missing is not None:
        source["fill_missing"] = fill_missing
        source["filled_values"] = {n: int(sum(m.sum() for m in parts[n].filled)) for n in ("train", "val", "test")}
    kept = parts["train"]  # after the validation split was carved out
    real = ~np.concatenate(kept.filled) if kept.filled else None  # the statistics count real values only
    return write_prepared(out, arrays, names, source, train_real=real)


def _label_key(label: str) -> tuple[int, float | str]:
    """Numeric labels in numeric order ("2" before "10"), others alphabetically after them."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rnnddp-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, help="training sequences (.ts or .npz)")
    p.add_argument("--test", type=Path, help="test sequences (.ts or .npz), or test text with --text")
    p.add_argument(
        "--val", type=Path, help="validation sequences, or text with --text; default: carved from the training data"
    )
    p.add_argument("--val-fraction", type=float, help="share of each class carved from train (0.2)")
    p.add_argument("--text", type=Path, metavar="FILE", help="training text (UTF-8): prepare text, not sequences")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="with --text: char (default), word or bpe")
    p.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="with --text: word: the N - 2 most frequent training words plus <unk>, <eos> (default: every word); "
        "bpe: merges up to N tokens (4096)",
    )
    p.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    p.add_argument(
        "--fill-missing",
        choices=FILL_MISSING,
        help="fill missing values ('?', NaN) inside a sequence: zero = 0.0, previous = the channel's last real "
        "value (a gap at the start: the first real value after it); default: refuse them. Missing values at "
        "the end of every channel always shorten the sequence; statistics count real values only",
    )
    a = p.parse_args(argv)
    try:
        if a.text is not None:
            return _main_text(a)
        if a.tokenizer is not None or a.vocab_size is not None:
            raise UserError("--tokenizer and --vocab-size apply to text: give --text FILE")
        if a.train is None or a.test is None:
            raise UserError(
                "give --train FILE and --test FILE (sequences), or --text FILE (text); see rnnddp-prepare --help"
            )
        val_fraction = 0.2 if a.val_fraction is None else a.val_fraction
        out = prepare(a.train, a.test, a.out, a.val, val_fraction, a.fill_missing)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    m = open_prepared(out).manifest
    what = f"{m['outputs']} value(s) per step" if m["target"] == "per_step_value" else f"{len(m['classes'])} classes"
    print(f"wrote {out}: {m['features']} features, {what}" + (" per step" if m["target"] == "per_step" else ""))
    for name, st in m["splits"].items():
        print(
            f"  {name:5s} {st['sequences']:6d} sequences, {st['steps']:8d} steps, "
            f"lengths {st['min_length']}-{st['max_length']} (median {st['median_length']:g})"
        )
    if "fill_missing" in m["source"]:
        filled = ", ".join(f"{k} {v}" for k, v in m["source"]["filled_values"].items())
        print(f"  filled missing values inside sequences with --fill-missing {m['source']['fill_missing']}: {filled}")
    return 0


def _main_text(a: argparse.Namespace) -> int:
    """``--text``: tokenize, write, print one summary (a UserError goes to ``main``)."""
    if a.train is not None:
        raise UserError("give --text FILE (text) or --train FILE (sequences), not both")
    if a.val_fraction is not None or a.fill_missing is not None:
        raise UserError(
            "--val-fraction and --fill-missing apply to sequences; text carves its last 10% (or give --val)"
        )
    out = prepare_text(a.text, a.out, a.tokenizer or "char", a.vocab_size, a.val, a.test)
    data = open_text(out)
    print(f"wrote {out}: {data.tokenizer.describe()}")
    for name, st in data.manifest["splits"].items():
        print(f"  {name:5s} {st['tokens']:8d} tokens ({st['characters']} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
