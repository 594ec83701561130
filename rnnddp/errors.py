"""The one exception type for bad input: the entry point prints it as one line and exits 2."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, wrong checkpoint).

    The message names the problem and the fix; no traceback is shown for it.
    """

    exit_code = 2


class NonFiniteLossError(UserError):
    """Training diverged (loss NaN/inf for too many consecutive steps); the last good checkpoint stays latest."""

    exit_code = 3


EXIT_STOPPED = 75  # stopped on a signal after a checkpoint: resumable (EX_TEMPFAIL, "try again")


def require_writable(folder: Path, fix: str) -> None:
    """Create ``folder`` if need be and check that a file can be written there; else a UserError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".rnnddp-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or type(e).__name__}); {fix}") from None
