"""Reading W&B's offline run files (``run-<id>.wandb``) back, to check what a run logged.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, a magic, a version), then 32 KiB
blocks of records, each a CRC32 (4 bytes), a length (2, little-endian) and a type (1: a whole
record, 2/3/4: its first, middle and last parts), holding ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[object]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too small for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts.append(data[pos + HEADER : pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):  # a whole record, or the last part of one
            yield pb.Record.FromString(b"".join(parts))
            parts = []


def history(path: Path) -> list[dict[str, str]]:
    """Each history row of the run file: key -> JSON value (``_step`` included)."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item})
    return rows


def offline_runs(run_dir: Path) -> list[Path]:
    """The run files of every W&B session of a run directory, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
