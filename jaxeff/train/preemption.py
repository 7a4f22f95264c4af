"""Turn SIGTERM / SIGINT into a request to checkpoint and stop at the next step boundary."""

from __future__ import annotations

import signal
import threading


class PreemptionGuard:
    """While active, the first SIGTERM or SIGINT is recorded instead of killing the process.

    A second SIGINT (Ctrl-C twice) falls through to Python's default and interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """Shell convention 128 + signal: schedulers then see a preempted run, not a finished one."""
        return 128 + int(self.received) if self.received is not None else 0

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
