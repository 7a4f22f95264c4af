"""Ctrl-C outside the training loop: one line and exit code 130, at once, at any moment.

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be: in the
middle of an import, or inside XLA's compiler, whose unwinding then crashes the interpreter at exit
(a segfault) after a page of traceback. Before training starts there is nothing new to save and
every checkpoint on disk is complete (Orbax renames a save into place only when it is finished), so
the handler installed here leaves without unwinding anything: it prints one line and calls
`os._exit`. The training loop replaces it with `PreemptionGuard` (first Ctrl-C: save at the step
boundary) and puts it back afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from jaxeff.errors import EXIT_INTERRUPTED


def exit_now(message: str, code: int = EXIT_INTERRUPTED) -> None:
    """Print `message` as the last line and end the process without running any more Python."""
    try:
        sys.stdout.flush()
        # After Ctrl-C the terminal shows "^C" with no newline: start a fresh line.
        sys.stderr.write(("\n" if code == EXIT_INTERRUPTED else "") + message + "\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _on_sigint(signum, frame) -> None:
    exit_now("jaxeff: interrupted (Ctrl-C); nothing new to save, the checkpoints on disk are complete")


def exit_at_once_on_ctrl_c() -> None:
    """Install the immediate-exit SIGINT handler (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_sigint)
