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

A hand-over (SIGUSR2, `ublkd upgrade`) starts the successor first and
lets the worker go only once the successor is ready (ublkd/succession.py).
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

from ublkd import succession
from ublkd.succession import (EXIT_HANDED_OVER, HAND_OVER_FAILED, READY, TOOK_OVER,
                              Predecessor, Successor, successor_argv)

log = logging.getLogger(__name__)

RESPAWN_BURST = 5
RESPAWN_WINDOW = 60.0
EXIT_SIGNALLED_BASE = 128  # the shell's convention: 128 + signal number
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


class Supervisor:
    """Runs `work` in a forked worker until it exits by itself.

    `work` gets the predecessor (this process was started to take a device
    over) in the first worker only: a worker forked again after a kill
    recovers the device like any other.
    """

    def __init__(self, name: str, work: Callable[[Predecessor | None], int],
                 status: Callable[[str], None], predecessor: Predecessor | None = None,
                 successor_argv: Callable[[], list[str]] = successor_argv):
        self.name = name
        self.successor_argv = successor_argv
        self.work = work
        self.status = status
        self.predecessor = predecessor
        self.worker = 0
        self.stopping = False
        self.hand_over_asked = False  # SIGUSR2 came; acted on outside the handler
        self.successor: Successor | None = None
        self.respawns: deque[float] = deque()
        self.wake_r = self.wake_w = -1  # the wake-up pipe of signals (run)

    def run(self) -> int:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self.forward)
        while True:
            self.worker = self.fork_worker()
            if self.predecessor is not None:
                self.predecessor.close()  # the worker has it
                self.predecessor = None
            status = self.wait_worker()
            if self.successor is not None:
                if READY in self.successor.said:
                    return self.finish_hand_over()
                self.drop_successor()
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
            code = self.work(self.predecessor)
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
            while True:
                watched = [pidfd, self.wake_r]
                if self.successor is not None and not self.successor.ended:
                    watched.append(self.successor.pipe)
                ready = select.select(watched, [], [], self.successor_patience())[0]
                if pidfd in ready:
                    break
                if self.successor is not None and self.successor_patience() == 0.0:
                    self.give_up_on_successor()
                drain(self.wake_r)  # the handler has run: forwarded
                if self.hand_over_asked:
                    self.hand_over_asked = False
                    self.start_successor()
                if self.successor is not None and self.successor.pipe in ready:
                    self.listen_to_successor()
        finally:
            os.close(pidfd)
        _, status = os.waitpid(self.worker, 0)
        return status

    def forward(self, signum: int, _frame) -> None:
        """SIGTERM/SIGINT stop the worker (and a successor that is taking the
        device over); either way it exits by itself and we exit with its
        status.  SIGUSR2 asks for a hand-over: `wait_worker` starts the
        successor."""
        if signum == signal.SIGUSR2:
            self.hand_over_asked = True
            return
        self.stopping = True
        if self.successor is not None and READY in self.successor.said:
            os.kill(self.successor.pid, signum)
        if self.worker:
            os.kill(self.worker, signum)

    def start_successor(self) -> None:
        """A new ublkd, from the binary installed now, to take the device over."""
        if self.successor is not None or self.stopping:
            return
        self.successor = Successor(self.worker, self.successor_argv())
        log.info("%s: hand-over asked: started ublkd pid %d to take the device over",
                 self.name, self.successor.pid)
        self.status(f"handing over to ublkd pid {self.successor.pid}")

    def listen_to_successor(self) -> None:
        """Ready: the worker may let go (SIGUSR2: it hands over as always).
        Gone before that: it could not take over, and the worker serves on."""
        successor = self.successor
        had_said = successor.said
        successor.hear()
        if READY in successor.said and READY not in had_said:
            os.kill(self.worker, signal.SIGUSR2)
        elif successor.ended and READY not in successor.said:
            code = successor.reap()
            self.successor = None
            log.error("%s: the new ublkd (pid %d) exited with %d before it was ready to take "
                      "the device over (its messages are above); this daemon keeps serving "
                      "it", self.name, successor.pid, code)
            self.status(f"{HAND_OVER_FAILED}: the new ublkd exited with {code}; still serving")

    def successor_patience(self) -> float | None:
        """Seconds the successor still has to say R (None: no limit now)."""
        if self.successor is None:
            return None
        return self.successor.seconds_left_to_be_ready()

    def give_up_on_successor(self) -> None:
        """It did not get ready in time: it holds nothing yet, so it is
        killed, and the worker, never told to let go, serves on."""
        successor = self.successor
        self.successor = None
        code = successor.reap(grace=0)
        log.error("%s: the new ublkd (pid %d) was not ready to take the device over within "
                  "%.0f s; killed it (exit %d), this daemon keeps serving it; its messages "
                  "above say where it waited", self.name, successor.pid,
                  succession.READY_TIMEOUT, code)
        self.status(f"{HAND_OVER_FAILED}: the new ublkd was not ready within "
                    f"{succession.READY_TIMEOUT:.0f} s; still serving")

    def drop_successor(self) -> None:
        """The worker ended before the successor was ready (a stop, a crash):
        the successor, which holds nothing yet, must not take the device."""
        self.successor.reap(grace=0)
        self.successor = None

    def finish_hand_over(self) -> int:
        """The worker let go of the device: once the successor serves it, this
        process (no longer the unit's main process) exits; if the successor
        died first, or hangs, systemd's restart recovers the device
        (EXIT_HANDED_OVER)."""
        successor = self.successor
        if successor.wait_for(TOOK_OVER, succession.TAKE_OVER_TIMEOUT):
            log.info("%s: ublkd pid %d serves the device now", self.name, successor.pid)
            return 0
        code = successor.reap(grace=succession.REAP_GRACE if successor.ended else 0)
        log.error("%s: the new ublkd (pid %d) ended with %d without serving the device "
                  "within %.0f s; systemd's restart recovers it", self.name, successor.pid,
                  code, succession.TAKE_OVER_TIMEOUT)
        return EXIT_HANDED_OVER

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
