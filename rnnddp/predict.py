"""Predict with a trained checkpoint, from files: digit images for classify, sequences for the sequence tasks.

    rnnddp-predict CHECKPOINT FILE [FILE ...] [key=value ...]

CHECKPOINT is a ``.pt`` file or a run directory. The checkpoint's task reads the files and prints
tab-separated lines (``Task.predict``):

- classify: any image (converted to a 28x28 grayscale digit, inverted when it is dark on light):
  ``file  label  probability``;
- sequence_classification: a ``.npy`` ``[T, F]`` or ``.csv`` sequence (a row per step):
  ``file  class  probability``;
- step_classification: one line per step, ``file  step  class  probability``;
- step_regression: one line per step, ``file  step  value [value ...]``.

Every file is read and checked before any prediction; a file that cannot be used is one line
naming it (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rnnddp import dist
from rnnddp.errors import UserError


def predict(target: str | Path, files: list[str], overrides: list[str] | None = None) -> list[str]:
    """The printed lines for ``files``, with the checkpoint's task, normalisation and network."""
    from rnnddp.evaluate import restore

    if not files:
        raise UserError("no input files given: rnnddp-predict CHECKPOINT FILE [FILE ...]")
    r = restore(target, overrides or [])
    return r.task.predict(r.module, [str(f) for f in files], r.path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    target, rest = argv[0], argv[1:]
    overrides = [a for a in rest if "=" in a and not Path(a).exists()]
    files = [a for a in rest if a not in overrides]
    try:
        lines = predict(target, files, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    dist.fast_exit(main())
