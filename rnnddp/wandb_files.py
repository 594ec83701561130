"""Reading W&B's local run files (``run-<id>.wandb``) back: what a run already gave W&B.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, a magic, a version), then 32 KiB
blocks of records, each a CRC32 (4 bytes), a length (2, little-endian) and a type (1: a whole
record, 2/3/4: its first, middle and last parts), holding ``wandb_internal_pb2.Record`` messages.
A file whose writer was killed ends in a cut record: reading stops there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[object]:
    """The complete records of a run file, in order."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too small for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind not in (1, 2, 3, 4) or pos + HEADER + length > len(data):
            return  # a cut tail (the writer was killed) or zero padding
        parts.append(data[pos + HEADER : pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):  # a whole record, or the last part of one
            try:
                yield pb.Record.FromString(b"".join(parts))
            except DecodeError:
                return
            parts = []


def history(path: Path) -> list[dict[str, str]]:
    """Each history row of the run file: key -> JSON value (``_step`` included)."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item})
    return rows


def offline_runs(run_dir: Path) -> list[Path]:
    """The run files of every offline W&B session of a run directory, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def last_step(run_dir: Path, run_id: str) -> int:
    """The highest history step that earlier sessions of W&B run ``run_id`` wrote under ``run_dir`` (-1: none).

    Online sessions keep the same log beside their upload (``run-<time>-<id>``), offline ones
    in ``offline-run-<time>-<id>``; W&B adds ``-1``, ``-2``... to a session started within the same
    second as an earlier one.
    """
    best = -1
    for path in (run_dir / "wandb").glob(f"*run-*-{run_id}*/run-{run_id}.wandb"):
        try:
            steps = [json.loads(row["_step"]) for row in history(path) if "_step" in row]
        except (OSError, ValueError):
            continue
        best = max([best, *steps])
    return best
