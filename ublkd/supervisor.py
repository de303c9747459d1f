"""`ublkd serve`'s first process: forks the worker that serves, and forks
a new one at once when the worker is killed.

Why a parent at all: a new ublkd process spends seconds importing Python
before it can recover a device (measured in docs/performance.md), while
applications wait on the quiesced queue.  The parent has everything
imported already and holds nothing of the device (no /dev/ublkcN, no
backing file, no threads), so a forked worker recovers at once: the
kernel quiesces the device when the killed worker's ring goes away, and
the new worker sends START_USER_RECOVERY .. END_USER_RECOVERY as always.

What stays systemd's job: the parent is the unit's main process.  When it
dies, the worker dies with it (PR_SET_PDEATHSIG) and Restart= brings a new
one; a worker that stops answering misses the watchdog (it pings, with
NotifyAccess=all) and systemd kills the unit; a worker that exits with a
status (clean stop, hand-over, an error it diagnosed) ends the parent with
that status, so systemd sees what the worker decided.  Only a worker
killed by a signal (SIGKILL, the OOM killer, SIGSEGV in native code) is
replaced in place, at most RESPAWN_BURST times per RESPAWN_WINDOW seconds;
beyond that the parent exits and systemd's own start limit applies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

RESPAWN_BURST = 5
RESPAWN_WINDOW = 60.0
EXIT_SIGNALLED_BASE = 128  # the shell's convention: 128 + signal number
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


class Supervisor:
    """Runs `work` in a forked worker until it exits by itself."""

    def __init__(self, name: str, work: Callable[[], int], status: Callable[[str], None]):
        self.name = name
        self.work = work
        self.status = status
        self.worker = 0
        self.stopping = False
        self.respawns: deque[float] = deque()
        self.wake_r = self.wake_w = -1  # the wake-up pipe of signals (run)

    def run(self) -> int:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self.forward)
        while True:
            self.worker = self.fork_worker()
            status = self.wait_worker()
            if not os.WIFSIGNALED(status):
                return os.waitstatus_to_exitcode(status)
            signum = os.WTERMSIG(status)
            if not self.may_respawn(signum):
                return EXIT_SIGNALLED_BASE + signum
            log.warning("%s: worker %d killed by %s; a new worker recovers the device",
                        self.name, self.worker, signal.Signals(signum).name)
            self.status(f"worker {self.worker} killed by {signal.Signals(signum).name}, "
                        f"recovering")

    def fork_worker(self) -> int:
        """The child serves and never returns into the parent's loop."""
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            os.close(self.wake_r)
            os.close(self.wake_w)
            die_with_parent(parent)
            code = self.work()
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def wait_worker(self) -> int:
        """The worker's wait status once it has exited; a signal meanwhile is
        forwarded at once.

        Not a blocking waitpid: a signal that lands just before the call
        enters the kernel interrupts nothing, and its Python handler (the
        forwarding) would only run once the worker had exited by itself,
        i.e. a stop would wait for systemd's timeout.  The interpreter
        writes every signal to the wake-up pipe the moment it arrives.
        """
        pidfd = os.pidfd_open(self.worker)
        try:
            while pidfd not in select.select([pidfd, self.wake_r], [], [])[0]:
                drain(self.wake_r)  # the handler has run: forwarded
        finally:
            os.close(pidfd)
        _, status = os.waitpid(self.worker, 0)
        return status

    def forward(self, signum: int, _frame) -> None:
        """SIGTERM/SIGINT stop the worker, SIGUSR2 asks it to hand over; either
        way it exits by itself and we exit with its status."""
        self.stopping = True
        if self.worker:
            os.kill(self.worker, signum)

    def may_respawn(self, signum: int) -> bool:
        if self.stopping:
            log.error("%s: worker %d killed by %s while stopping", self.name, self.worker,
                      signal.Signals(signum).name)
            return False
        moment = time.monotonic()
        while self.respawns and moment - self.respawns[0] > RESPAWN_WINDOW:
            self.respawns.popleft()
        if len(self.respawns) >= RESPAWN_BURST:
            log.error("%s: worker killed %d times within %.0f s (last: %s); leaving the "
                      "device to systemd's restart", self.name, len(self.respawns) + 1,
                      RESPAWN_WINDOW, signal.Signals(signum).name)
            return False
        self.respawns.append(moment)
        return True


def drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def die_with_parent(parent: int) -> None:
    """The worker must not outlive the unit's main process: systemd's restart
    would find the device still served and refuse to take it over."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_SIGNALLED_BASE + signal.SIGKILL)
