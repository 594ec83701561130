"""Stop requests by signal: the handler only records the signal; the trainer acts at a step boundary.

Nothing is saved inside a handler (it could interrupt a half-written tensor or a collective).
A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal
import time
from types import FrameType


class StopRequest:
    def __init__(self, names: list[str]) -> None:
        self.signum: int | None = None
        self.time: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}
        for name in names:
            sig = signal.Signals[str(name)]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self.time = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
