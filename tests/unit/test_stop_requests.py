"""The serving loop's stop signals, with real signals sent to this process."""

import os
import signal
import threading
import time

import pytest

from ublkd.daemon import StopRequests


@pytest.fixture
def stop():
    requests = StopRequests()
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR2)}
    requests.listen(tuple(saved))
    yield requests
    signal.set_wakeup_fd(-1)
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    os.close(requests.read_fd)
    os.close(requests.write_fd)


def send_later(*signums: int) -> None:
    """From another thread, as systemd and the supervisor send them: back to back."""
    def send():
        for signum in signums:
            os.kill(os.getpid(), signum)
    threading.Timer(0.2, send).start()


def test_no_signal_means_no_stop(stop):
    assert stop.wait(0.05) is False
    assert not stop.hand_over


def test_two_sigterms_back_to_back_wake_the_waiting_loop_once(stop):
    send_later(signal.SIGTERM, signal.SIGTERM)
    started = time.monotonic()
    assert stop.wait(60) is True
    assert time.monotonic() - started < 30  # woken by the pipe, not by the 60 s timeout
    time.sleep(0.1)  # the second signal, if not yet handled
    assert stop.names() == "SIGTERM"
    assert not stop.hand_over


def test_sigusr2_asks_for_a_hand_over_and_a_later_sigterm_keeps_it(stop):
    send_later(signal.SIGUSR2, signal.SIGTERM)
    started = time.monotonic()
    assert stop.wait(60) is True
    assert time.monotonic() - started < 30  # woken by the pipe, not by the 60 s timeout
    time.sleep(0.1)
    assert stop.hand_over
    assert stop.names() == "SIGUSR2, SIGTERM"
    assert stop.wait(60) is True  # stays asked for: the loop never waits again
