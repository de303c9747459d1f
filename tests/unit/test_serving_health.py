"""The serving loop's verdicts: a failed queue ends the worker like a crash
(never like a stop, which deletes the device); a slow backend keeps the
watchdog fed.  Pure logic around Device, with stand-ins for the queues and
the notifier; no control device is used (any call to it would fail the test).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ublkd.config import parse_config
from ublkd.daemon import Device
from ublkd.kernel.control import DeviceInfo


class FakeQueue:
    def __init__(self, alive: bool = True, stalled_for: float | None = None,
                 lost: tuple[float, int, bool] | None = None):
        self.q_id = 0
        self.alive = alive
        self.error = None if alive else RuntimeError("io_uring_enter: EBUSY")
        self.heartbeat = time.monotonic()
        self.since = None if stalled_for is None else time.monotonic() - stalled_for
        self.lost = lost

    def stalled_since(self) -> float | None:
        return self.since

    def backend_lost(self) -> tuple[float, int, bool] | None:
        return self.lost


class RecordingNotifier:
    tick = 0.01
    stall_limit = 10.0

    def __init__(self) -> None:
        self.messages: list[str] = []

    def ready(self, status: str) -> None:
        self.messages.append(f"READY {status}")

    def status(self, status: str) -> None:
        self.messages.append(f"STATUS {status}")

    def watchdog(self) -> None:
        self.messages.append("WATCHDOG")

    def ensure_stop_order(self, *_args) -> None:
        pass


def device_with(*queues: FakeQueue) -> tuple[Device, RecordingNotifier]:
    config = parse_config("vol0", 'backend = "null"\nsize = "64MiB"\n', Path("vol0.toml"))
    notifier = RecordingNotifier()
    device = Device(config, control=None, notifier=notifier)  # type: ignore[arg-type]
    device.info = DeviceInfo(dev_id=3, nr_queues=1, queue_depth=8, state=1,
                             max_io_buf_bytes=1 << 19, pid=os.getpid(), flags=0)
    device.queues = list(queues)  # type: ignore[arg-type]
    return device, notifier


def test_a_dead_queue_ends_the_worker_by_sigkill_like_a_crash():
    device, _ = device_with(FakeQueue(alive=False))
    child = os.fork()
    if child == 0:
        try:
            device.serve_until_stopped()
        finally:
            os._exit(0)  # only if the device was left to a stop: the test fails
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_slow_backend_keeps_the_watchdog_fed_and_says_so():
    device, notifier = device_with(FakeQueue(stalled_for=25.0))
    device.check_health()
    device.check_health()
    assert notifier.messages == [
        "WATCHDOG",
        "STATUS /dev/ublkb3 LIVE, backend I/O unanswered for over 20 s, null backend, "
        "recovered 0 times",
        "WATCHDOG",
    ]
    device.queues[0].since = None
    device.check_health()
    assert notifier.messages[-1] == "STATUS /dev/ublkb3 LIVE, null backend, recovered 0 times"


def test_a_lost_nbd_server_is_in_status_and_the_watchdog_still_fed():
    lost = (time.monotonic() - 12, 7, False)
    device, notifier = device_with(FakeQueue(lost=lost), FakeQueue(lost=(lost[0] + 1, 2, False)))
    device.config = parse_config("vol0", 'backend = "nbd"\nuri = "nbd://h/e"\n',
                                 Path("vol0.toml"))
    device.check_health()
    assert notifier.messages == [
        "WATCHDOG", "STATUS /dev/ublkb3 LIVE, reconnecting to nbd://h/e for over 10 s "
                    "(9 request(s) waiting), nbd backend, recovered 0 times"]
    device.queues[0].lost = (lost[0], 0, True)
    device.check_health()
    assert "(I/O fails with EIO until it is back)" in notifier.messages[-1]
    for queue in device.queues:
        queue.lost = None
    device.check_health()
    assert notifier.messages[-1] == "STATUS /dev/ublkb3 LIVE, nbd backend, recovered 0 times"


def test_a_silent_queue_loop_stops_the_pings():
    device, notifier = device_with(FakeQueue())
    device.queues[0].heartbeat -= 60
    device.check_health()
    assert "WATCHDOG" not in notifier.messages
    assert notifier.messages[-1].startswith("STATUS /dev/ublkb3 unhealthy: queue 0 loop silent")


def test_a_hand_over_that_would_lose_the_device_is_refused_and_serving_goes_on():
    device, _ = device_with(FakeQueue())  # flags 0: recovery = "none"
    device.stop.record(signal.SIGUSR2, None)
    assert device.stop.wait(0)
    assert device.refuse_hand_over()
    assert not device.stop.wait(0) and not device.stop.hand_over
    device.stop.record(signal.SIGTERM, None)
    assert device.stop.wait(0) and not device.refuse_hand_over()  # a stop is a stop
