"""The stop-signal handler's rules: a first SIGINT or SIGTERM while a pair trains asks the step in
progress to finish, a second Ctrl-C (or a signal outside training) stops at once, a repeated SIGTERM
does not, and the caller's handlers come back after the run. A scheduler's own signal (submitit's
SIGUSR2) joins them for the length of a job."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from sslbench.training.interrupt import (
    RunInterrupted,
    also_stop_on,
    ignore_stop_signals,
    stop_on_signals,
    stop_requested,
    training_section,
    worker_signal_setup,
)

SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


def _send(signum: int) -> None:
    """The signal, to this process; its Python handler has run when this returns."""
    signal.raise_signal(signum)


@pytest.fixture
def known_handlers() -> Iterator[list[int]]:
    """Python's default SIGINT handler (KeyboardInterrupt) and a SIGTERM handler that records, whatever
    the test runner installed; the runner's own are put back afterwards."""
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------------------
# The handler: a first signal in training asks, a second one (or one outside training) stops at once
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_first_signal_in_training_asks_to_stop_and_a_second_ctrl_c_stops_at_once(
    signum, status, known_handlers, capfd
):
    with stop_on_signals():
        assert stop_requested() is None
        with pytest.raises(RunInterrupted, match="stopped at once") as second, training_section("pair"):
            _send(signum)  # returns: the step in progress goes on
            assert stop_requested() == signum
            assert f"{signal.Signals(signum).name}: finishing this step" in capfd.readouterr().err
            _send(signal.SIGINT)
    assert second.value.exit_status == status and second.value.out_dir is None
    assert stop_requested() is None


def test_a_repeated_sigterm_is_not_a_second_request(known_handlers):
    """Schedulers send SIGTERM to every process of a job and torchrun forwards it again: the checkpoint
    must still be written, so only a Ctrl-C escalates."""
    with stop_on_signals():
        with (
            pytest.raises(RunInterrupted, match="pair stopped after training") as stop,
            training_section("pair"),
        ):
            _send(signal.SIGTERM)
            _send(signal.SIGTERM)  # ignored: the step goes on to its checkpoint
            assert stop_requested() == signal.SIGTERM
        assert stop.value.exit_status == 143
        _send(signal.SIGTERM)  # a late repeat while the stop unwinds does nothing more


def test_a_signal_the_caller_ignores_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job started from a script
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_a_signal_outside_training_stops_at_once(signum, status, known_handlers):
    with stop_on_signals():
        with training_section("pair"):
            pass  # a pair trained and finished; evaluating now
        with pytest.raises(RunInterrupted, match="stopped at once") as stop:
            _send(signum)
        assert stop_requested() is None  # not a request: the run stops here
    assert stop.value.exit_status == status


def test_the_previous_handlers_are_back_after_the_run(known_handlers):
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    stopped_after_training = pytest.raises(RunInterrupted, match="stopped after training")
    with stopped_after_training, stop_on_signals(), training_section("pair"):
        _send(signal.SIGINT)
        assert stop_requested() == signal.SIGINT
    assert stop_requested() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler
    with pytest.raises(KeyboardInterrupt) as plain:
        _send(signal.SIGINT)
    assert type(plain.value) is KeyboardInterrupt  # Python's own, not the run's
    _send(signal.SIGTERM)
    assert known_handlers == [signal.SIGTERM]

    with pytest.raises(RunInterrupted), stop_on_signals():  # also when the run stops on a signal
        _send(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler
    assert stop_requested() is None


def test_a_new_run_starts_without_the_previous_runs_request(known_handlers):
    with pytest.raises(RunInterrupted), stop_on_signals(), training_section("pair"):
        _send(signal.SIGINT)
    with pytest.raises(RunInterrupted), stop_on_signals(), training_section("pair"):
        assert stop_requested() is None
        _send(signal.SIGINT)  # a first signal again: asks, does not stop at once
        assert stop_requested() == signal.SIGINT


@pytest.mark.parametrize(("signum", "status"), SIGNALS)
def test_a_request_after_the_loops_last_look_stops_before_evaluation(signum, status, known_handlers):
    """A first signal while the final checkpoint is written is not lost: the pair is not evaluated, and
    the resume (from that final checkpoint) evaluates it."""
    stopped = pytest.raises(RunInterrupted, match="pair stopped after training, before evaluation")
    with stop_on_signals():
        with stopped as stop, training_section("pair"):
            _send(signum)  # after the loop's last check: only the section's end sees it
        assert stop.value.exit_status == status
    with stop_on_signals(), training_section("pair"):
        pass  # no request: the section ends quietly


def test_outside_the_main_thread_nothing_changes(known_handlers):
    seen: list[object] = []

    def run() -> None:
        try:
            with stop_on_signals(), training_section("pair"):
                seen.append(signal.getsignal(signal.SIGINT))
        except Exception as error:  # signal.signal outside the main thread raises ValueError
            seen.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def test_data_loader_workers_ignore_the_stop_signals(known_handlers):
    ignore_stop_signals(worker_id=0)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_a_schedulers_signal_stops_a_run_as_sigterm_does_while_the_job_lasts(known_handlers, capfd):
    """``sslbench submit``'s job: SIGUSR2 (submitit's warning before a time limit or a preemption) asks the
    step to finish; the SIGTERM a scheduler may send after it is not a second request; the status says
    which signal stopped the run, so the job knows to requeue itself."""
    received: list[int] = []

    def submitits_handler(signum: int, frame: object) -> None:  # what the job has outside the run
        received.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitits_handler)
    try:
        with also_stop_on(signal.SIGUSR2):
            stopped = pytest.raises(RunInterrupted, match="pair stopped after training")
            with stop_on_signals(), stopped as stop, training_section("pair"):
                _send(signal.SIGUSR2)
                _send(signal.SIGTERM)  # ignored: the step goes on to its checkpoint
                assert stop_requested() == signal.SIGUSR2
            assert "SIGUSR2: finishing this step" in capfd.readouterr().err
            assert stop.value.exit_status == 128 + signal.SIGUSR2
            assert signal.getsignal(signal.SIGUSR2) is submitits_handler  # back after the run
        with stop_on_signals():  # after the job: a plain run leaves SIGUSR2 alone
            _send(signal.SIGUSR2)
        assert received == [signal.SIGUSR2] and known_handlers == []
        with also_stop_on(signal.SIGUSR2):
            worker_init = worker_signal_setup()  # what the job's training loader is given
        worker_init(0)  # as in a spawned worker, which has none of the job's state: the signal is bound in
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)
