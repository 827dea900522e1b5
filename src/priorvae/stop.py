"""Stopping on request, deterministically: SIGTERM sets a flag; loops stop at a safe point.

The signal handler only records the request (:func:`handle_sigterm`). The long loops (training
steps and epochs, evaluation batches, ex-post fitting, the classifier's training, compare's
cells) call :func:`check_stop` between their steps, which raises :class:`Terminated` there:
never inside a write, a torch call or a library, so the command's own clean-up (a training
run marked ``interrupted``) always runs and the command line exits with 143. A second
SIGTERM ends the process at once, the default way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

__all__ = ["Terminated", "check_stop", "stop_requested", "request_stop", "handle_sigterm"]

_requested = False


class Terminated(KeyboardInterrupt):
    """SIGTERM was received; raised by :func:`check_stop` at the next safe point."""


def request_stop() -> None:
    """Ask every loop to stop at its next safe point (what SIGTERM does)."""
    global _requested
    _requested = True


def stop_requested() -> bool:
    return _requested


def check_stop() -> None:
    """Raise :class:`Terminated` if a stop was requested (call between steps of a loop)."""
    if _requested:
        raise Terminated()


def _on_sigterm(signum, frame) -> None:
    if _requested:  # the second one: stop now (the kernel frees the run's lock)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    request_stop()


@contextlib.contextmanager
def handle_sigterm():
    """While inside, SIGTERM only requests a stop (main thread only; elsewhere a no-op)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested = False
