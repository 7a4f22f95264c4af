"""Turn SIGTERM / SIGINT into a checkpoint and a clean stop at a step boundary.

One process: the first SIGTERM or SIGINT sets a flag that the loop reads after each step.
Several processes: every process must stop at the *same* step, so SIGTERM goes to JAX's own
preemption notifier (installed by `jax.distributed.initialize`) and the loop asks
`multihost_utils.reached_preemption_sync_point(step)`, which all processes answer alike. A SIGINT is
forwarded to that mechanism as a SIGTERM to ourselves.

A second Ctrl-C skips the checkpoint the first one asked for, but never costs one that is already being written:
the process ends as soon as that save is complete (at most `FINISH_SAVE_TIMEOUT_S`), and a third Ctrl-C ends it at
once. Schedulers send SIGTERM, then SIGKILL after a grace period; a SIGTERM is handled like the first Ctrl-C, so a
grace period longer than one step plus one checkpoint save keeps every checkpoint (docs/architecture.md).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import jax
from jax.experimental import multihost_utils

from jaxeff.interrupts import exit_now


FINISH_SAVE_TIMEOUT_S = 300.0


class PreemptionGuard:
    """First SIGINT/SIGTERM: stop at the next step boundary with a checkpoint. Second SIGINT: stop without it, once
    a checkpoint already being written is complete. Third: at once.

    `writing_step`: the step of a checkpoint save in flight, or None (`CheckpointStore.writing_step`)."""

    def __init__(self, writing_step: Callable[[], int | None] = lambda: None,
                 finish_save_timeout_s: float = FINISH_SAVE_TIMEOUT_S):
        self.received: int | None = None
        self._previous = {}
        self._multi_process = jax.process_count() > 1
        self._writing_step, self._timeout_s = writing_step, finish_save_timeout_s
        self._finishing: int | None = None  # the step whose save the second Ctrl-C waits for

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            # Leave SIGTERM to JAX's notifier when it exists; Python's handler would replace it.
            signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            self._second_interrupt()
            return
        self.received = signum
        if signum == signal.SIGINT:
            os.write(2, b"\njaxeff: Ctrl-C: saving a checkpoint at the end of this step "
                        b"(Ctrl-C again stops without it)\n")
        if self._multi_process:
            os.kill(os.getpid(), signal.SIGTERM)

    def _second_interrupt(self) -> None:
        if self._finishing is not None:
            exit_now(f"jaxeff: interrupted a third time: stopped at once; checkpoint step {self._finishing} was not "
                     "finished and is discarded on the next start, the earlier ones are complete")
        step = self._writing_step()
        if step is None:
            exit_now("jaxeff: interrupted again (Ctrl-C twice): stopped at once; no checkpoint was being written, "
                     "every one on disk is complete")
        self._finishing = step
        os.write(2, f"\njaxeff: Ctrl-C again: finishing checkpoint step {step}, which is already being written (at "
                    f"most {self._timeout_s:.0f}s), then stopping without another one. Ctrl-C a third time stops at "
                    "once and loses it\n".encode())
        # The handler returns (a synchronous save may be running in this very thread); the watcher ends the process.
        threading.Thread(target=self._exit_when_written, args=(step,), daemon=True).start()

    def _exit_when_written(self, step: int) -> None:
        deadline = time.monotonic() + self._timeout_s
        while self._writing_step() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._writing_step() is None:
            exit_now(f"jaxeff: checkpoint step {step} is complete; stopped (Ctrl-C twice). Run the same command again "
                     "to resume from it")
        exit_now(f"jaxeff: checkpoint step {step} was not complete after {self._timeout_s:.0f}s; stopped. It is "
                 "discarded on the next start, the earlier ones are complete")

    def hold_if_finishing(self) -> None:
        """At a step boundary after a second Ctrl-C: start nothing more; the watcher thread ends the process."""
        while self._finishing is not None:
            time.sleep(0.1)

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
