"""Atomic checkpoint files, keep-k, latest/best pointers and safe loading.

A checkpoint counts only once it is committed: the ``.pt`` file is written to a temporary
name, fsynced and renamed, then its SHA-256 is written the same way beside it
(``step_0000100.pt.sha256``), and only then does ``latest`` move. A crash or kill at any
moment therefore leaves ``latest`` on a complete, verified file. Loading never unpickles
arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from rnnddp.errors import UserError

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d+)\.pt$")
# Checkpoints carry this as "format"; 2 = trained without the validation split's samples, task settings in
# their own sections. Earlier ones evaluate, but do not resume; later ones (a newer rnnddp) are refused.
FORMAT = 2


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, require_marker: bool = True) -> str | None:
    """None when ``path`` is a committed, intact checkpoint; else the reason it is not.

    ``require_marker=False`` accepts a file without its ``.sha256`` (one a user names explicitly,
    e.g. copied without it); a marker that is present must still match.
    """
    marker = Path(str(path) + ".sha256")
    if not path.is_file():
        return "file missing"
    if not marker.is_file():
        return "no .sha256 commit marker (the save did not finish)" if require_marker else None
    if marker.read_text().strip() != sha256_file(path):
        return "checksum mismatch (truncated or corrupted)"
    return None


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint on CPU without running pickled code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notice; the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; keep the line that names what was refused.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("Unsupported", "Trying to"))), lines[-1] if lines else "")
        raise UserError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain "
            f"containers ({detail[:120]}); use a checkpoint written by rnnddp"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:160]}") from None


class CheckpointManager:
    """Owns ``run_dir/checkpoints``: write (rank 0 only), keep the newest k, find the latest."""

    def __init__(self, run_dir: str | Path, keep: int = 3, writer: bool = True) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.writer = writer

    @property
    def latest_pointer(self) -> Path:
        return self.dir / "latest"

    def step_files(self) -> list[Path]:
        """Step checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := STEP_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def clean_leftovers(self) -> list[Path]:
        """Remove the temporary files of saves that never finished (a process killed mid-save); returns them.

        Call it at the start of a run, before any save: no save of this run is in flight then.
        """
        if not self.writer or not self.dir.is_dir():
            return []
        leftovers = [p for p in self.dir.iterdir() if ".tmp." in p.name or p.name.endswith(".tmp")]
        for path in leftovers:
            path.unlink(missing_ok=True)
            log.warning("removed %s, left by a save that did not finish", path)
        return leftovers

    def find_latest(self) -> Path | None:
        """The newest intact checkpoint, preferring what ``latest`` names; warns on skips."""
        candidates: list[Path] = []
        if self.latest_pointer.is_file():
            candidates.append(self.dir / self._latest_name())
        candidates += [p for p in self.step_files() if p not in candidates]
        for path in candidates:
            reason = verify(path)
            if reason is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, reason)
        return None

    def point_latest(self, resumed: Path | None) -> None:
        """Make ``latest`` name the checkpoint a run continues from (rank 0, once the run is going ahead),
        or remove it when the run starts over: a damaged newest checkpoint that was skipped is not where
        the run stands, and a kill before its next save must not leave ``latest`` on it."""
        if not self.writer or not self.latest_pointer.is_file():
            return
        if resumed is None:
            self.latest_pointer.unlink(missing_ok=True)
        elif resumed.parent.resolve() == self.dir.resolve() and self._latest_name() != resumed.name:
            self._write_latest(resumed)

    def _latest_name(self) -> str:
        return self.latest_pointer.read_text().strip()

    def _write_latest(self, path: Path) -> None:
        write_atomic(self.latest_pointer, (path.name + "\n").encode())

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path | None:
        """Write ``step_XXXXXXX.pt`` atomically, move ``latest``, prune; returns the path."""
        if not self.writer:
            return None
        path = self.dir / f"step_{step:07d}.pt"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=path.name + ".tmp.")
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                digest = sha256_file(Path(tmp))
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            write_atomic(Path(str(path) + ".sha256"), (digest + "\n").encode())
            if best:
                self._link_best(path, digest)
            self._write_latest(path)
        except OSError as e:
            raise UserError(
                f"cannot write checkpoint {path} ({e.strerror or e}); free disk space or make "
                f"{self.dir} writable (earlier checkpoints are untouched)"
            ) from None
        self._prune(keep=path)
        return path

    def _link_best(self, path: Path, digest: str) -> None:
        best = self.dir / "best.pt"
        tmp = self.dir / "best.pt.tmp"
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)  # a second name for the same bytes: no copy, survives pruning
        os.replace(tmp, best)
        write_atomic(Path(str(best) + ".sha256"), (digest + "\n").encode())

    def _prune(self, keep: Path) -> None:
        for old in self.step_files()[self.keep :]:
            if old == keep:
                continue
            for p in (Path(str(old) + ".sha256"), old):  # marker first: a half-pruned file is never trusted
                p.unlink(missing_ok=True)
