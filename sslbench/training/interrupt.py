"""Stopping a run on request without losing it: Ctrl-C (SIGINT) or SIGTERM (how a cluster preempts).

While a pair trains, the first signal lets the step in progress finish; the loop then writes a
checkpoint and stops the run with ``RunInterrupted``, and the command line prints the exact command that
resumes it. A second Ctrl-C stops at once; a repeated SIGTERM does not (schedulers send it to every
process of a job, and torchrun forwards it again; their SIGKILL follows anyway). Outside training
(loading data, evaluating) the first signal stops at once: the newest checkpoint is then the one to
resume from. In a distributed run the ranks agree on the request every step, on the host.

Under a scheduler that warns of a preemption or a time limit with a signal of its own (submitit's SIGUSR2,
see ``sslbench submit``), ``also_stop_on`` makes that signal one more stop signal: the run checkpoints at
the next step and ``RunInterrupted.signum`` tells the job to requeue itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from sslbench.base.collectives import is_main, max_on_host

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_scheduler_signals: list[int] = []  # the signals ``also_stop_on`` adds (inherited by forked workers)


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a run in this process: SIGINT, SIGTERM and a scheduler's own, if any."""
    return (*STOP_SIGNALS, *_scheduler_signals)


@contextlib.contextmanager
def also_stop_on(signum: int) -> Iterator[None]:
    """For the length of a scheduled job, ``signum`` stops a run as SIGTERM does."""
    _scheduler_signals.append(signum)
    try:
        yield
    finally:
        _scheduler_signals.remove(signum)


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
        self.main = True  # False on the other ranks of a distributed run: the main rank reports

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _StopRequest:
    """The one signal handler of the process while a run is under way."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received while training
        self.training = False
        self.stopping = False  # raised once already: a repeated SIGTERM is not a second request

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            if is_main():  # os.write, not print: the signal may have interrupted a write to stderr
                name = signal.Signals(signum).name
                note = f"\nsslbench: {name}: finishing this step and saving a checkpoint"
                os.write(2, f"{note} (Ctrl-C again stops at once)\n".encode())
            return
        if signum != signal.SIGINT and (self.signum is not None or self.stopping):
            return  # a scheduler's signals come again, and to every process: only Ctrl-C insists
        self.stopping = True
        raise RunInterrupted("stopped at once", signum=self.signum or signum)


_request = _StopRequest()


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _request.signum


def agreed_stop() -> int | None:
    """The stop request of any rank (every rank calls this at the same point), or None."""
    return max_on_host(_request.signum or 0) or None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the length of a run, SIGINT and SIGTERM (and a scheduler's signal) stop it as described above
    (main thread only: Python delivers signals there; a signal the caller ignores, as a background job's
    SIGINT, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, _request.handle)
        for signum in stop_signals()
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    _request.signum, _request.stopping = None, False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _request.signum, _request.training, _request.stopping = None, False, False


@contextlib.contextmanager
def training_section(pair: str) -> Iterator[None]:
    """While ``pair`` trains, a first signal waits for the step in progress. One that comes after the
    loop's last look (while the final checkpoint is written, say) stops the run here, before evaluation."""
    _request.training = True
    try:
        yield
    finally:
        _request.training = False
    signum = agreed_stop()  # every rank gets here when the loop returns; an exception skips it on all
    if signum is not None:
        raise RunInterrupted(f"{pair} stopped after training, before evaluation", signum=signum)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """While data-loader workers start: they inherit the blocked signals, so a Ctrl-C can reach none of
    them before ``ignore_stop_signals`` runs (the main process decides when to stop)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int, signals: tuple[int, ...] | None = None) -> None:
    """A data-loader worker's ``worker_init_fn``: the workers leave stopping to the training process, so
    a Ctrl-C sent to the whole process group does not kill them under a step that is finishing.
    ``signals`` (default: this process's stop signals) is given by ``worker_signal_setup``."""
    signals = stop_signals() if signals is None else signals
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # pending ones are now dropped


def worker_signal_setup() -> Callable[[int], None]:
    """``ignore_stop_signals`` with the stop signals of now bound in: a worker started by spawn or
    forkserver (not fork) does not inherit a scheduler's signal that ``also_stop_on`` added here."""
    return functools.partial(ignore_stop_signals, signals=stop_signals())
