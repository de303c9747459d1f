"""A hand-over with the successor started first (`ublkd upgrade`, SIGUSR2).

Why: a new ublkd process needs seconds of Python start-up before it can
recover a device (measured in docs/performance.md), and while no server
runs the device's I/O waits.  So the unit's main process starts the
successor (the `ublkd` installed now, same arguments) *before* its worker
lets go of the device, and the pause is only what the kernel needs between
the old server's exit and the new one's END_USER_RECOVERY.

The two talk over one pipe, the successor writing:

    R   "ready": configuration, state and device found, the device is one
        that survives a hand-over; it now waits for the device (the old
        worker's exit) and recovers it.  The old main process then sends
        SIGUSR2 to its worker, which hands over as always and exits.
    T   "took over": the device is LIVE again, served by the successor,
        which has told systemd it is the unit's main process (MAINPID=).
        The old main process exits.

End of file without R: the successor could not take over (a broken new
version, a refused device); the old worker keeps serving, and the journal
says why.  End of file after R without T: the successor died while the
device had no server; the old main process exits with EXIT_HANDED_OVER
and systemd's restart recovers the device, as after a crash.  So does a
successor that has not said T within TAKE_OVER_TIMEOUT: it is killed.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from dataclasses import dataclass

EXIT_HANDED_OVER = 75  # the worker left the device to a successor
ENVIRONMENT = "UBLKD_SUCCESSOR_OF"  # "PID:FD": the worker taken over from, the pipe
READY = b"R"
HAND_OVER_FAILED = "hand-over failed"  # how the old daemon's STATUS= begins then
# Seconds from R to T at most: the successor's own waits (the backing file's
# lock, START_USER_RECOVERY) give up after 30 s each; `ublkd upgrade` waits
# 120 s in all.
TAKE_OVER_TIMEOUT = 120.0
# Seconds from the successor's start to R at most.  Before R it only opens
# and checks the backend and makes its rings (an NBD successor says R before
# it connects): seconds even under emulation.  One that hangs there is
# killed and the worker serves on; `ublkd upgrade` (120 s) then reports the
# failure instead of giving up on a hand-over that never ends.
READY_TIMEOUT = 60.0
REAP_GRACE = 10.0  # seconds a successor that closed its pipe has to exit
TOOK_OVER = b"T"


@dataclass
class Predecessor:
    """In a successor: the worker that serves the device now, and the pipe to
    its main process."""

    pid: int
    fd: int

    def say(self, word: bytes) -> None:
        try:
            os.write(self.fd, word)
        except OSError:
            pass  # the old main process is gone: nobody to tell

    def close(self) -> None:
        os.close(self.fd)


def predecessor_from_environment() -> Predecessor | None:
    """The predecessor this process was started to succeed, if any.  Taken out
    of the environment, so that no later process of ours inherits it; the
    watchdog is ours from now on (WATCHDOG_PID named the old main process)."""
    value = os.environ.pop(ENVIRONMENT, None)
    if not value:
        return None
    pid, fd = (int(part) for part in value.split(":"))
    os.set_inheritable(fd, False)
    if "WATCHDOG_PID" in os.environ:
        os.environ["WATCHDOG_PID"] = str(os.getpid())
    return Predecessor(pid, fd)


class Successor:
    """In the old main process: the new ublkd it started, and what it said."""

    def __init__(self, worker: int, argv: list[str]):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_inheritable(write_end, True)
        environment = dict(os.environ, **{ENVIRONMENT: f"{worker}:{write_end}"})
        try:
            self.pid = os.posix_spawn(argv[0], argv, environment)
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self.pipe = read_end
        self.said = b""
        self.ended = False  # end of file: it said all it will
        self.ready_deadline = time.monotonic() + READY_TIMEOUT

    def seconds_left_to_be_ready(self) -> float | None:
        """How long it may still take to say R; None once it has, or has ended."""
        if READY in self.said or self.ended:
            return None
        return max(self.ready_deadline - time.monotonic(), 0.0)

    def hear(self) -> None:
        """Read what it wrote since; call when the pipe is readable."""
        try:
            while chunk := os.read(self.pipe, 16):
                self.said += chunk
            self.ended = True
        except BlockingIOError:
            pass

    def wait_for(self, word: bytes, timeout: float) -> bool:
        """Block until it says `word` (True), or closes the pipe without it or
        `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while word not in self.said and not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([self.pipe], [], [], left)
            self.hear()
        return word in self.said

    def reap(self, grace: float = REAP_GRACE) -> int:
        """Its exit code once it has exited; SIGKILL if it has not within
        `grace` seconds (a successor that failed must not linger, and one
        that hangs must not hang the old main process)."""
        os.close(self.pipe)
        pidfd = os.pidfd_open(self.pid)
        try:
            if not select.select([pidfd], [], [], grace)[0]:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def successor_argv() -> list[str]:
    """This command again, from the ublkd installed now: the script that was
    started (/usr/bin/ublkd) reads the new version's modules; `python -m
    ublkd` runs the same module from the same interpreter."""
    program = sys.argv[0]
    if os.path.basename(program) == "__main__.py" or not os.access(program, os.X_OK):
        return [sys.executable, "-m", "ublkd", *sys.argv[1:]]
    return [program, *sys.argv[1:]]
