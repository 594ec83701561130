"""Readers for users' sequence files: the UEA/UCR archive's ``.ts`` text format and NumPy ``.npz``.

Each reader returns a :class:`Sequences`: one ``[T_i, F]`` float32 array per sequence and its
target: a class name, or a per-step array (a class at every step, or values at every step).
``read_sequence_file`` reads one sequence for prediction (``.npy`` or ``.csv``). Malformed input
is a :class:`UserError` naming the file, the line or record, and the fix.

Missing values (``?`` in a ``.ts``, NaN or infinity in either) follow one rule, :func:`resolve_missing`:
those at the end of a sequence shorten it (the archive's way to write unequal lengths); those inside it
are refused unless a fill is asked for (``rnnddp-prepare --fill-missing zero|previous``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from rnnddp.errors import UserError

FillMissing = Literal["zero", "previous"]
FILL_MISSING: tuple[str, ...] = ("zero", "previous")


@dataclass
class Sequences:
    path: Path
    features: list[np.ndarray]  # [T_i, F] float32 each
    labels: list[str] = field(default_factory=list)  # one class name per sequence (sequence targets)
    # Per-step targets, one array per sequence: class names [T_i] (str), or values [T_i, K] (float32).
    steps: list[np.ndarray] = field(default_factory=list)
    step_values: bool = False  # steps hold values (regression), not classes
    class_names: list[str] = field(default_factory=list)  # declared by the file (.ts @classLabel), else empty
    # Where --fill-missing put a value: one bool [T_i, F] per sequence, or empty when nothing was filled.
    filled: list[np.ndarray] = field(default_factory=list)

    @property
    def feature_count(self) -> int:
        return int(self.features[0].shape[1]) if self.features else 0

    @property
    def per_step(self) -> bool:
        return bool(self.steps)

    @property
    def target_kind(self) -> str:
        """As a prepared folder's manifest names it (rnnddp.data.sequences.TARGET_KINDS)."""
        return "per_step_value" if self.step_values else "per_step" if self.per_step else "label"


def resolve_missing(
    seq: np.ndarray, where: str, fill: FillMissing | None = None, unit: str = "channel"
) -> tuple[np.ndarray, np.ndarray | None]:
    """The rule for missing values (NaN or infinity) in a ``[T, F]`` sequence: (the sequence, where it was filled).

    Steps after the last step with a real value in any channel are cut: the sequence is that long.
    What is missing before that (a gap followed by a real value in its channel, or the tail of a
    channel that ends before another) is inside the sequence: a UserError naming ``where`` unless
    ``fill`` is given. ``zero`` puts 0.0 there; ``previous`` the channel's last real value before
    it, or for a gap at the start, the first one after it. The mask (True where filled) lets the
    statistics count real values only; None when nothing was filled. A sequence without a single
    real value is a UserError whatever ``fill`` says.
    """
    real = np.isfinite(seq)
    if real.all():
        return seq, None
    steps = np.flatnonzero(real.any(axis=1))
    if not len(steps):
        raise UserError(f"{where}: every value of the sequence is missing; drop it from the file")
    length = int(steps[-1]) + 1
    seq, real = seq[:length], real[:length]
    gaps = ~real
    if not gaps.any():
        return seq, None
    if fill is None:
        c, t = np.argwhere(gaps.T)[0]  # the first by channel, then step (as a .ts line writes them)
        raise UserError(
            f"{where}: {int(gaps.sum())} missing value(s) inside the sequence (first: {unit} {c + 1}, step {t + 1}); "
            "only trailing ones shorten a sequence: fill them with rnnddp-prepare --fill-missing {zero,previous}, "
            "or fix the file"
        )
    out = seq.copy()
    if fill == "zero":
        out[gaps] = 0.0
        return out, gaps
    for c in np.flatnonzero(gaps.any(axis=0)):
        have = np.flatnonzero(real[:, c])
        if not len(have):
            raise UserError(
                f"{where}: {unit} {c + 1} has no real value, so --fill-missing previous has none to carry; "
                "give --fill-missing zero or fix the file"
            )
        last = np.maximum.accumulate(np.where(real[:, c], np.arange(length), -1))  # the last real step so far
        last[last < 0] = have[0]  # a leading gap: the first real value after it
        out[:, c] = seq[last, c]
    return out, gaps


def read_sequences(path: Path, fill_missing: FillMissing | None = None) -> Sequences:
    """A ``.ts`` or ``.npz`` file, by its suffix; missing values as :func:`resolve_missing` says."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a .ts or .npz file")
    if path.suffix.lower() == ".ts":
        return read_ts(path, fill_missing)
    if path.suffix.lower() == ".npz":
        return read_npz(path, fill_missing)
    raise UserError(f"{path}: unknown format {path.suffix!r}; give a UEA/UCR .ts file or a NumPy .npz (x, y)")


def _flag(value: str, tag: str, path: Path, line_no: int) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"{path}:{line_no}: @{tag} must be true or false, not {value!r}")


def read_ts(path: Path, fill_missing: FillMissing | None = None) -> Sequences:
    """The UEA/UCR ``.ts`` format: ``@`` header lines, then one sequence per line after ``@data``:
    channels separated by ``:``, values by ``,``, ``?`` for a missing value, the class label last.
    Under ``@missing true`` (the default) missing values follow :func:`resolve_missing`."""
    header: dict[str, str] = {}
    out = Sequences(path, [])
    in_data = False
    dims: int | None = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise UserError(f"{path}:{line_no}: expected an @ header line or @data, got {line[:40]!r}")
                tag, _, value = line[1:].partition(" ")
                tag, value = tag.lower(), value.strip()
                if tag == "data":
                    in_data = True
                    if header.get("timestamps", "false").lower() == "true":
                        raise UserError(
                            f"{path}: @timeStamps true is not supported; write the values without time stamps"
                        )
                    if "targetlabel" in header and header["targetlabel"].lower().startswith("true"):
                        raise UserError(
                            f"{path}: regression targets (@targetLabel) are not supported; use class labels"
                        )
                    if "classlabel" not in header:
                        raise UserError(f"{path}: no @classLabel line before @data; add '@classLabel true <labels>'")
                    dims = int(header["dimensions"]) if header.get("dimensions", "").isdigit() else None
                    labels = header["classlabel"].split()
                    if not labels or not _flag(labels[0], "classLabel", path, line_no):
                        raise UserError(f"{path}: @classLabel false: sequences need class labels for this task")
                    out.class_names = labels[1:]
                    missing_ok = _flag(header.get("missing", "true"), "missing", path, line_no)
                    continue
                header[tag] = value
                continue
            parts = line.split(":")
            if len(parts) < 2:
                raise UserError(f"{path}:{line_no}: a sequence line needs its channels and a class label after ':'")
            *channels, label = parts
            label = label.strip()
            if dims is None:
                dims = len(channels)
            if not label or _is_number_list(label):  # the last field holds values: the label is missing
                raise UserError(f"{path}:{line_no}: no class label at the end of the line (after the last ':')")
            if len(channels) != dims:
                raise UserError(f"{path}:{line_no}: {len(channels)} channels, but @dimensions is {dims}; fix the line")
            if out.class_names and label not in out.class_names:
                raise UserError(f"{path}:{line_no}: class label {label!r} is not in @classLabel {out.class_names}")
            values = [_channel(c, path, line_no, i) for i, c in enumerate(channels)]
            lengths = {len(v) for v in values}
            if len(lengths) != 1:
                raise UserError(
                    f"{path}:{line_no}: channels of different lengths {sorted(lengths)}; pad or cut them alike"
                )
            seq = np.asarray(values, dtype=np.float32).T  # [T, F]
            if not missing_ok and not np.isfinite(seq).all():
                raise UserError(
                    f"{path}:{line_no}: a missing value ('?', NaN or infinity) but the header says @missing false"
                )
            seq, filled = resolve_missing(seq, f"{path}:{line_no}", fill_missing)
            _add_filled(out, filled, seq.shape)
            out.features.append(seq)
            out.labels.append(label)
    if not in_data:
        raise UserError(f"{path}: no @data line; is this a UEA/UCR .ts file?")
    if not out.features:
        raise UserError(f"{path}: no sequences after @data")
    return out


def _add_filled(out: Sequences, filled: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """Keep ``out.filled`` one mask per sequence read so far, or empty while nothing was filled."""
    if filled is None and not out.filled:
        return
    if not out.filled:
        out.filled = [np.zeros(f.shape, dtype=bool) for f in out.features]
    out.filled.append(filled if filled is not None else np.zeros(shape, dtype=bool))


def _is_number_list(text: str) -> bool:
    try:
        [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return "," in text


def _channel(text: str, path: Path, line_no: int, index: int) -> list[float]:
    items = [v.strip() for v in text.split(",")]
    if items == [""]:
        raise UserError(f"{path}:{line_no}: channel {index + 1} is empty: every sequence needs at least one step")
    try:
        return [math.nan if v in ("?", "NaN", "nan") else float(v) for v in items]
    except ValueError:
        bad = next(v for v in items if not _is_float(v))
        raise UserError(f"{path}:{line_no}: channel {index + 1} has {bad!r}, not a number") from None


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return v in ("?", "NaN", "nan")
    return True


def read_npz(path: Path, fill_missing: FillMissing | None = None) -> Sequences:
    """``x``: ``[N, T, F]`` (or ``[N, T]``: one feature), or an object array of ``[T_i, F]``
    sequences; ``y``: ``[N]`` labels (numbers or strings), or per-step targets (an object array of
    ``[T_i]`` or ``[T_i, K]`` arrays, or ``[N, T(, K)]``): integers or strings are a class at every
    step, floats are values at every step. NaN or infinity in ``x`` is missing
    (:func:`resolve_missing`): NaN rows at the end shorten a sequence, and its per-step targets
    are cut alike."""
    try:
        data = np.load(path, allow_pickle=True)  # object arrays need pickle: the user's own file
        keys = set(data.files)
    except Exception as e:
        raise UserError(
            f"{path}: not a readable .npz ({type(e).__name__}); save it with numpy.savez(x=..., y=...)"
        ) from None
    for key in ("x", "y"):
        if key not in keys:
            raise UserError(f"{path}: no array {key!r} (it has {sorted(keys)}); save it with numpy.savez(x=..., y=...)")
    x, y = data["x"], data["y"]
    if x.dtype == object:
        seqs = [np.asarray(s, dtype=np.float32) for s in x]
    else:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3:
            raise UserError(f"{path}: x has shape {x.shape}; give [N, T, F], or an object array of [T_i, F] sequences")
        seqs = list(x)
    if len(y) != len(seqs):
        raise UserError(f"{path}: {len(seqs)} sequences in x but {len(y)} labels in y; give one per sequence")
    out = Sequences(path, [])
    features = None
    written: list[int] = []  # each sequence's length in the file, before trailing missing rows are cut
    for i, s in enumerate(seqs):
        if s.ndim == 1:
            s = s[:, None]
        if s.ndim != 2 or s.shape[0] == 0:
            raise UserError(f"{path}: record {i}: sequence of shape {s.shape}; every sequence needs [T >= 1, F]")
        features = s.shape[1] if features is None else features
        if s.shape[1] != features:
            raise UserError(f"{path}: record {i}: {s.shape[1]} features, record 0 has {features}; give all the same")
        written.append(len(s))
        s, filled = resolve_missing(s, f"{path}: record {i}", fill_missing, unit="feature")
        _add_filled(out, filled, s.shape)
        out.features.append(np.ascontiguousarray(s, dtype=np.float32))
    if y.dtype != object and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # a column of labels, [N, 1] (scikit-learn's shape): one per sequence
    # Per-step targets: an object array of [T_i] or [T_i, K] arrays, or a regular [N, T(, K)] array.
    per_step = (y.dtype == object and all(np.ndim(t) >= 1 for t in y)) or (y.dtype != object and y.ndim >= 2)
    if not per_step:
        out.labels = [str(t.item() if hasattr(t, "item") else t) for t in y]
        return out
    steps = [np.asarray(t) for t in y]
    out.step_values = all(t.dtype.kind == "f" for t in steps)
    for i, t in enumerate(steps):
        if len(t) == written[i]:
            t = t[: len(out.features[i])]  # the targets of the cut rows go with them
        if len(t) != len(out.features[i]) or t.ndim > 2 or (not out.step_values and t.ndim != 1):
            raise UserError(
                f"{path}: record {i}: per-step targets of shape {t.shape} for {len(out.features[i])} steps; "
                "give [T] labels (integers or strings) or [T] / [T, K] values (floats)"
            )
        if out.step_values:
            t = t.astype(np.float32).reshape(len(t), -1)
            if t.shape[1] != steps[0].reshape(len(steps[0]), -1).shape[1]:
                raise UserError(f"{path}: record {i}: {t.shape[1]} values per step, record 0 has a different count")
            if not np.isfinite(t).all():
                raise UserError(f"{path}: record {i}: NaN or infinity in the per-step values; fill or drop them")
        elif t.dtype.kind not in "iubUSO":
            raise UserError(f"{path}: record {i}: per-step labels of dtype {t.dtype}; give integers or strings")
        else:
            t = t.astype(str)
        out.steps.append(t)
    return out


def read_sequence_file(path: Path, features: int) -> np.ndarray:
    """One sequence for prediction: ``.npy`` ``[T, F]`` (``[T]`` for one feature) or ``.csv`` (a row per
    step, a column per feature; a header row is skipped). float32 ``[T, F]``; raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a .npy or .csv sequence")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
            if not isinstance(x, np.ndarray):  # an .npz archive under another name
                raise UserError(f"{path}: holds several arrays, not one sequence; save it with numpy.save(path, x)")
        elif suffix == ".csv":
            x = _read_csv(path)
        else:
            raise UserError(f"{path}: unknown format {suffix!r}; give a .npy ([T, F]) or .csv (a row per step) file")
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: cannot be read ({str(e).splitlines()[0][:100]}); give a .npy or .csv sequence"
        ) from None
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.dtype.kind not in "fiub":
        raise UserError(f"{path}: a sequence of shape {x.shape} and dtype {x.dtype}; give numbers as [T >= 1, F]")
    if x.shape[1] != features:
        raise UserError(f"{path}: {x.shape[1]} features per step, the model was trained on {features}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: NaN or infinity in the sequence; fill or drop missing values first")
    return x


def _read_csv(path: Path) -> np.ndarray:
    """A header row is one that is not all numbers, or that is the column numbers 0, 1, ... (pandas'
    ``to_csv`` of an unnamed frame writes those)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # utf-8-sig: a spreadsheet's byte-order mark
    rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if rows:
        first = [v.strip() for v in rows[0][1].split(",")]
        if not _is_number_list(rows[0][1] + ",0") or first == [str(i) for i in range(len(first))]:
            rows = rows[1:]
    values = []
    for line_no, row in rows:
        try:
            values.append([float(v) for v in row.split(",")])
        except ValueError:
            raise UserError(f"{path}:{line_no}: not comma-separated numbers: {row[:40]!r}") from None
    if len({len(v) for v in values}) > 1:
        raise UserError(f"{path}: rows of different lengths; give one column per feature on every row")
    return np.array(values, dtype=np.float32)
