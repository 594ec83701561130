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
    """Check that ``folder`` can be written, or created and written, without creating it (bad input
    leaves nothing behind); else a UserError naming it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():  # a file where a folder must go
            raise NotADirectoryError(20, "Not a directory")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".rnnddp-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or type(e).__name__}); {fix}") from None
