"""Turn SIGTERM / SIGINT into a checkpoint and a clean stop at a step boundary.

One process: the first SIGTERM or SIGINT sets a flag that the loop reads after each step.
Several processes: every process must stop at the *same* step, so SIGTERM goes to JAX's own
preemption notifier (installed by `jax.distributed.initialize`) and the loop asks
`multihost_utils.reached_preemption_sync_point(step)`, which all processes answer alike. A SIGINT is
forwarded to that mechanism as a SIGTERM to ourselves.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from jaxeff.interrupts import exit_now


class PreemptionGuard:
    """A second SIGINT (Ctrl-C twice) ends the process at once: one line, exit code 130."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._multi_process = jax.process_count() > 1

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            # Leave SIGTERM to JAX's notifier when it exists; Python's handler would replace it.
            signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            exit_now("jaxeff: interrupted again (Ctrl-C twice): stopped at once; a checkpoint being written is "
                     "discarded on the next start, the earlier ones are complete")
        self.received = signum
        if signum == signal.SIGINT:
            os.write(2, b"\njaxeff: Ctrl-C: saving a checkpoint at the end of this step "
                        b"(Ctrl-C again stops at once, without it)\n")
        if self._multi_process:
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Call once per step on every process, with the same step."""
        if self._multi_process:
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop and self.received is None:
                self.received = signal.SIGTERM
            return stop
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """Shell convention 128 + signal: schedulers then see a preempted run, not a finished one."""
        return 128 + int(self.received) if self.received is not None else 0

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
