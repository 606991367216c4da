"""Stopping a long run cleanly, in one place. [ours]

The first Ctrl-C (SIGINT) or SIGTERM asks for a stop after the running training step, so the checkpoint written
then is whole: weights, optimiser and random state of one and the same step, and the resumed run equals an
uninterrupted one. A second signal stops at once, keeping the last checkpoint. Outside training (evaluating, or
between the tasks of a benchmark) :func:`sigterm_as_interrupt` makes a scheduler's SIGTERM stop like Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (a scheduler's, torchrun's) raise KeyboardInterrupt as Ctrl-C does, in the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


class StopRequest:
    """While training, the first SIGINT or SIGTERM sets :attr:`requested` (the loop then saves and returns); a
    second one raises KeyboardInterrupt at once. Outside the main thread signals cannot be caught, and this does
    nothing. The handlers found on entry are put back on exit."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (a checkpoint is saved); press Ctrl-C again to stop at once", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def run(self, loop: Callable[[], bool], step: Callable[[], int], save: Callable[[], Path], checkpoint: Path) -> None:
        """Run ``loop`` (True when it finished, False when it saved and returned on :attr:`requested`) and turn
        every way it can stop into a saved checkpoint and a KeyboardInterrupt:

        - a stop request: the loop saved ``checkpoint`` after its step; say so and raise;
        - a second signal: the running step may be half done, so the last checkpoint stays as it is;
        - a KeyboardInterrupt raised by code between steps (or where signals cannot be caught): save what is done.
        """
        start = step()
        try:
            finished = loop()
        except KeyboardInterrupt:
            if self.requested:
                print(f"\nstopped during step {step() + 1}; the last checkpoint is kept; run again to resume",
                      file=sys.stderr)
            elif step() > start:
                print(f"\ninterrupted at step {step()}; checkpoint saved to {save()}; run again to resume",
                      file=sys.stderr)
            raise
        if not finished:
            print(f"\nstopped after step {step()}; checkpoint saved to {checkpoint}; run again to resume",
                  file=sys.stderr)
            raise KeyboardInterrupt
