"""What prepared folders share: the names in their manifest's ``format`` (which reader takes a folder),
and how one is written (staged beside its final name and renamed when complete)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

SEQUENCES_FORMAT = "rnnddp-sequences"  # rnnddp-prepare --train/--test (rnnddp/data/sequences.py)
TEXT_FORMAT = "rnnddp-text"  # rnnddp-prepare --text (rnnddp/data/text.py)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; when the block ends, its files are fsynced and it is
    renamed to ``out``. On any error (or a kill) it is removed: no half-written ``out`` is ever seen."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
