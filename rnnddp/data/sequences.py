"""The prepared sequence data set on disk: one folder, memory-mapped, read by each rank in place.

    DIR/manifest.json                  format version, feature count, class names, train-split
                                       mean/std per feature, length statistics per split
    DIR/<split>.features.npy           float32 [total_steps, F]: every sequence of the split, end to end
    DIR/<split>.offsets.npy            int64 [N + 1]: sequence i is rows offsets[i]:offsets[i+1]
    DIR/<split>.labels.npy             int64 [N] (one class per sequence) or
    DIR/<split>.targets.npy            int64 [total_steps] (a class at every step) or
                                       float32 [total_steps, K] (K values at every step)

The layout is Arrow's list array (one flat values buffer plus offsets), which Megatron's indexed
data set (``.bin`` + ``.idx``) also uses; each array is a plain ``.npy`` file, whose header
carries its dtype and shape, so ``numpy.load(mmap_mode="r")`` maps it without a reader of our own
and a rank touches only the pages of the rows its batches hold. Features are stored as given;
normalisation (the train split's statistics in the manifest) is applied when a batch is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rnnddp.data.batches import check_batch
from rnnddp.data.buckets import POOL, bucketed_batches, rank_share
from rnnddp.data.formats import SEQUENCES_FORMAT, TEXT_FORMAT, staged_folder
from rnnddp.errors import UserError

FORMAT = SEQUENCES_FORMAT
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# The manifest's "target" kinds, and what each holds in words (for messages).
TARGET_KINDS = {
    "label": "a class per sequence",
    "per_step": "a class at every step",
    "per_step_value": "values at every step",
}
IGNORE = -100  # the class of a padding step (cross_entropy's ignore_index)


@dataclass
class SplitArrays:
    """One split in memory or mapped: features [total_steps, F], offsets [N + 1], labels or targets."""

    features: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None = None  # [N]
    targets: np.ndarray | None = None  # [total_steps] classes or [total_steps, K] values
    _fds: dict[str, int] = field(default_factory=dict, repr=False)  # mapped file -> its descriptor for pread

    @property
    def target_kind(self) -> str:
        if self.targets is None:
            return "label"
        return "per_step_value" if self.targets.dtype.kind == "f" else "per_step"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.features[self.offsets[i] : self.offsets[i + 1]]

    def read_sequence(self, i: int) -> np.ndarray:
        """Sequence ``i``'s rows, copied out; from a mapped file by one read call, not through the mapping.

        Both go through the page cache, but pages read this way are not mapped into the process, so
        under a memory limit the kernel drops them cheaply; pages touched through the mapping must
        be unmapped first (docs/performance.md: an epoch 9.5x faster under a limit below the data).
        """
        return self._read_rows(self.features, i)

    def step_targets(self, i: int) -> np.ndarray:
        return self.targets[self.offsets[i] : self.offsets[i + 1]]

    def read_step_targets(self, i: int) -> np.ndarray:
        """Sequence ``i``'s per-step targets, copied out by one read call as its rows are (``read_sequence``)."""
        return self._read_rows(self.targets, i)

    def _read_rows(self, a: np.ndarray, i: int) -> np.ndarray:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if not isinstance(a, np.memmap) or not a.filename or not a.flags.c_contiguous:
            return np.array(a[start:stop])
        fd = self._fds.get(a.filename)
        if fd is None:
            fd = self._fds[a.filename] = os.open(a.filename, os.O_RDONLY)
        out = np.empty((stop - start, *a.shape[1:]), dtype=a.dtype)
        if os.preadv(fd, [out], a.offset + start * a.strides[0]) != out.nbytes:
            raise UserError(f"{a.filename}: shorter than its offsets say; prepare the folder again with rnnddp-prepare")
        return out

    def to(self, device: Any) -> SplitArrays:
        """Stays where it is (mapped from disk); batches go to the device as they are read."""
        return self


class PaddedBatch(NamedTuple):
    x: torch.Tensor  # [b, T, F] float32, zeros after each sequence's end
    lengths: torch.Tensor  # [b] int64, on the CPU (as packing wants them)
    y: torch.Tensor  # [b] classes, or per step: [b, T] classes (IGNORE after the end) or [b, T, K] values
    global_steps: int  # real steps in the whole global batch (all ranks): a per-step loss divides by it


def pad_batch(split: SplitArrays, index: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> PaddedBatch:
    """Sequences ``index`` padded with zeros to the longest, with their targets padded alike.

    Only these sequences' rows are read from the mapped file.
    """
    index = np.asarray(index)
    lengths = split.offsets[index + 1] - split.offsets[index]  # not split.lengths: a pass over every offset
    longest = int(lengths.max())
    x = np.zeros((len(index), longest, split.features.shape[1]), dtype=np.float32)
    for row, i in enumerate(index):
        seq = split.read_sequence(int(i))
        x[row, : len(seq)] = seq if mean is None else (seq - mean) / std
    if split.targets is None:
        y = np.asarray(split.labels[index]).astype(np.int64)
    else:
        values = split.targets.dtype.kind == "f"
        shape = (len(index), longest, split.targets.shape[1]) if values else (len(index), longest)
        y = np.zeros(shape, dtype=np.float32) if values else np.full(shape, IGNORE, dtype=np.int64)
        for row, i in enumerate(index):
            t = split.read_step_targets(int(i))
            y[row, : len(t)] = t
    return PaddedBatch(
        torch.from_numpy(x), torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(y), int(lengths.sum())
    )


class SequenceBatches:
    """Per-rank training batches of a prepared split: length-bucketed (or random), padded per batch.

    Yields :class:`PaddedBatch` es (x and y on ``device``) whose ``global_steps`` counts the real
    steps of the whole global batch, the same on every rank. ``window_metrics`` reports this rank's padding share since its last call (``train/pad_fraction``).
    """

    def __init__(
        self,
        split: SplitArrays,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        bucket: bool = True,
        pool: int = POOL,
    ) -> None:
        check_batch(global_batch_size, world_size, len(split), "the training split")
        self.split, self.global_batch, self.rank, self.world = split, global_batch_size, rank, world_size
        self.seed, self.device, self.mean, self.std = seed, device, mean, std
        self.bucket, self.pool = bucket, pool
        self.steps_per_epoch = len(split) // global_batch_size
        self.lengths = np.asarray(split.lengths)
        self._real = self._padded = 0

    def global_batches(self, epoch: int) -> np.ndarray:
        if self.bucket:
            return bucketed_batches(self.lengths, self.global_batch, self.seed, epoch, self.pool)
        rng = np.random.default_rng([self.seed, epoch])
        n = self.steps_per_epoch * self.global_batch
        return rng.permutation(len(self.lengths))[:n].reshape(self.steps_per_epoch, self.global_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[PaddedBatch]:
        batches = self.global_batches(epoch)
        share = rank_share(batches, self.rank, self.world)
        for step in range(start_step, self.steps_per_epoch):
            x, lengths, y, _ = pad_batch(self.split, share[step], self.mean, self.std)
            self._real += int(lengths.sum())
            self._padded += x.shape[0] * x.shape[1]
            yield PaddedBatch(
                x.to(self.device, non_blocking=True),
                lengths,
                y.to(self.device, non_blocking=True),
                int(self.lengths[batches[step]].sum()),
            )

    def window_metrics(self, elapsed: float) -> dict[str, float]:
        fraction = 1.0 - self._real / self._padded if self._padded else 0.0
        self._real = self._padded = 0
        return {"train/pad_fraction": fraction}


def pack(features: list[np.ndarray], labels: np.ndarray | None, steps: list[np.ndarray] | None) -> SplitArrays:
    """Sequences end to end, with their offsets; ``steps``: per-step classes [T_i] or values [T_i, K]."""
    lengths = np.array([len(f) for f in features], dtype=np.int64)
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    targets = None
    if steps:
        targets = np.concatenate(steps)
        values = targets.dtype.kind == "f"
        targets = targets.astype(np.float32).reshape(len(targets), -1) if values else targets.astype(np.int64)
    # Row-major on disk: a sequence's rows are one contiguous range of the file (concatenate keeps the
    # column-major order of transposed inputs, such as the .ts reader's).
    return SplitArrays(np.ascontiguousarray(np.concatenate(features), dtype=np.float32), offsets, labels, targets)


def length_stats(split: SplitArrays) -> dict[str, float]:
    n = split.lengths
    return {
        "sequences": len(split),
        "steps": int(split.offsets[-1]),
        "min_length": int(n.min()),
        "max_length": int(n.max()),
        "mean_length": round(float(n.mean()), 3),
        "median_length": float(np.median(n)),
    }


def feature_stats(
    features: np.ndarray, chunk: int = 1 << 20, real: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature over all rows, in chunks (a mapped split may not fit in memory).

    ``real``: bool like ``features``, False where a value was filled in (``rnnddp-prepare
    --fill-missing``): only the real values count. NaN for a feature without a real value.
    """
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    count = np.zeros(features.shape[1])
    for start in range(0, len(features), chunk):
        part = np.asarray(features[start : start + chunk], dtype=np.float64)
        if real is None:
            count += len(part)
        else:
            keep = np.asarray(real[start : start + chunk], dtype=bool)
            part = np.where(keep, part, 0.0)
            count += keep.sum(axis=0)
        total += part.sum(axis=0)
        squares += (part * part).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        return mean, np.sqrt(np.maximum(squares / count - mean * mean, 0.0))


def write_prepared(
    out: Path,
    splits: dict[str, SplitArrays],
    class_names: list[str],
    source: dict[str, Any],
    train_real: np.ndarray | None = None,
) -> Path:
    """Write a prepared folder atomically: into a temporary folder beside ``out``, renamed when complete.

    ``out`` must not exist (nothing of the user's is replaced). Statistics come from ``splits["train"]``,
    from its real values only when ``train_real`` (bool like its features) marks the filled ones False.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or give another --out")
    train = splits["train"]
    mean, std = feature_stats(train.features, real=train_real)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        bad = int(np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std)))[0])
        raise UserError(
            f"{source.get('train', 'the train split')}: feature {bad + 1} has no real value in the train split "
            "(every one is missing or was filled); drop that feature or give it values"
        )
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "features": int(train.features.shape[1]),
        "target": train.target_kind,
        "classes": list(class_names),
        "mean": [round(float(v), 7) for v in mean],
        "std": [round(float(v), 7) if v > 0 else 1.0 for v in std],  # a constant feature: leave it as it is
        "splits": {name: length_stats(s) for name, s in splits.items()},
        "source": source,
    }
    if train.target_kind == "per_step_value":  # for scale: the error of always predicting the train mean
        t_mean, t_std = feature_stats(train.targets)
        manifest.update(outputs=int(train.targets.shape[1]), target_mean=t_mean.tolist(), target_std=t_std.tolist())
    with staged_folder(out) as tmp:
        for name, s in splits.items():
            np.save(tmp / f"{name}.features.npy", s.features)
            np.save(tmp / f"{name}.offsets.npy", s.offsets)
            if s.targets is not None:
                np.save(tmp / f"{name}.targets.npy", s.targets)
            else:
                np.save(tmp / f"{name}.labels.npy", s.labels)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


@dataclass
class Prepared:
    path: Path
    manifest: dict[str, Any]

    @property
    def feature_count(self) -> int:
        return int(self.manifest["features"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def target_kind(self) -> str:
        return str(self.manifest["target"])

    @property
    def per_step(self) -> bool:
        return self.target_kind != "label"

    def split(self, name: str) -> SplitArrays | None:
        """A split memory-mapped (None when the folder has none of that name)."""
        if name not in self.manifest["splits"]:
            return None

        def load(kind: str) -> np.ndarray:
            f = self.path / f"{name}.{kind}.npy"
            try:
                return np.load(f, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UserError(f"{f}: cannot be read ({e}); prepare the folder again with rnnddp-prepare") from None

        kind = "targets" if self.per_step else "labels"
        arrays = SplitArrays(load("features"), np.asarray(load("offsets")))
        setattr(arrays, kind, load(kind))
        return arrays


def open_prepared(path: Path) -> Prepared:
    """The manifest of a prepared folder, checked; the arrays are mapped when a split is asked for."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(
            f"sequences.path={path} is not a prepared data set (no manifest.json); "
            "make one with: rnnddp-prepare --train FILE --test FILE --out DIR"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise UserError(f"{manifest_path} is not valid JSON; prepare the folder again with rnnddp-prepare") from None
    if manifest.get("format") == TEXT_FORMAT:
        raise UserError(
            f"sequences.path={path} holds prepared text, not sequences; train it with task=language_model lm.path={path}"
        )
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not an rnnddp sequence manifest; prepare the folder with rnnddp-prepare")
    if manifest.get("version") != FORMAT_VERSION or manifest.get("target") not in TARGET_KINDS:
        raise UserError(
            f"{manifest_path} has format version {manifest.get('version')}, this rnnddp reads version "
            f"{FORMAT_VERSION}; prepare the folder again with this rnnddp-prepare"
        )
    if not _usable_stats(manifest):  # normalisation is (x - mean) / std: NaN in, NaN in every batch
        raise UserError(
            f"sequences.path={path}: its manifest's mean/std per feature hold NaN, infinity or a zero std "
            "(normalisation divides by the std); prepare the folder again with this rnnddp-prepare"
        )
    return Prepared(path, manifest)


def _usable_stats(manifest: dict[str, Any]) -> bool:
    """The feature statistics are ``features`` finite numbers each, the std's above zero."""
    try:
        mean = np.asarray(manifest["mean"], dtype=np.float64)
        std = np.asarray(manifest["std"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return False
    n = manifest.get("features")
    shape = (n,) if isinstance(n, int) else mean.shape
    return mean.shape == std.shape == shape and bool(
        np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
    )
