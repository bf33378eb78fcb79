"""Ctrl-C during training: finish the step, save a checkpoint, evaluate, stop (a second Ctrl-C aborts)."""
from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    """While active, the first Ctrl-C (SIGINT) sets ``requested``; the second aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint and evaluating the held-out set "
              "(Ctrl-C again aborts the save, or skips the evaluation once the checkpoint is saved)", file=sys.stderr)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
