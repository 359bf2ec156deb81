"""Stopping a run on request without losing it: Ctrl-C (SIGINT) or SIGTERM (how a cluster preempts).

While a pair trains, the first signal lets the step in progress finish; the loop then writes a
checkpoint and stops the run with ``RunInterrupted``, and the command line prints the exact command that
resumes it. A second signal stops at once. Outside training (loading data, evaluating) the first signal
stops at once: the newest checkpoint is then the one to resume from.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal; ``out_dir`` holds what it finished and the checkpoints to go on from.

    A KeyboardInterrupt, so no ``except Exception`` (one failed pair must not stop the others) mistakes
    it for a pair's failure.
    """

    def __init__(self, what: str, out_dir: Path | None = None, signum: int = signal.SIGINT) -> None:
        super().__init__(what)
        self.what = what
        self.out_dir = out_dir
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _StopRequest:
    """The one signal handler of the process while a run is under way."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received while training
        self.training = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            print(
                f"\nsslbench: {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise RunInterrupted("stopped at once", signum=self.signum or signum)


_request = _StopRequest()


def stop_requested() -> int | None:
    """The signal that asked training to stop, or None."""
    return _request.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the length of a run, SIGINT and SIGTERM stop it as described above (main thread only: Python
    delivers signals there; elsewhere, and under a test's own handlers, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _request.handle) for signum in STOP_SIGNALS}
    _request.signum = None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _request.signum, _request.training = None, False


@contextlib.contextmanager
def training_section(pair: str) -> Iterator[None]:
    """While ``pair`` trains, a first signal waits for the step in progress. One that comes after the
    loop's last look (while the final checkpoint is written, say) stops the run here, before evaluation."""
    _request.training = True
    try:
        yield
    finally:
        _request.training = False
    if _request.signum is not None:
        raise RunInterrupted(f"{pair} stopped after training, before evaluation", signum=_request.signum)


def ignore_stop_signals(worker_id: int) -> None:
    """A data-loader worker's ``worker_init_fn``: the main process decides when to stop, so a Ctrl-C sent
    to the whole process group must not kill the workers under a step that is finishing."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
