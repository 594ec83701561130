"""The one exception type for bad input: the entry point prints it as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, wrong checkpoint).

    The message names the problem and the fix; no traceback is shown for it.
    """

    exit_code = 2


class NonFiniteLossError(UserError):
    """Training diverged (loss NaN/inf for too many consecutive steps); the last good checkpoint stays latest."""

    exit_code = 3


EXIT_STOPPED = 75  # stopped on a signal after a checkpoint: resumable (EX_TEMPFAIL, "try again")
