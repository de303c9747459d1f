"""systemd glue: notifications, the watchdog, shutdown ordering, logging.

Kept in one module so the rest of ublkd runs the same outside systemd:
without NOTIFY_SOCKET every notification is a no-op.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ublkd.errors import (DeviceNotFoundError, HandOverRefusedError, KernelError,
                          MissingDependencyError)
from ublkd.succession import HAND_OVER_FAILED

if TYPE_CHECKING:
    from collections.abc import Callable

    import sdnotify

log = logging.getLogger(__name__)

SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """Prefix each line with <N> so journald records its priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def setup_logging(verbose: bool) -> None:
    """Log to stderr: plain under journald (it adds time and unit), stamped otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s ublkd: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def watchdog_interval() -> float | None:
    """WatchdogSec= of our unit in seconds, if the watchdog is meant for us."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and int(pid) != os.getpid()):
        return None
    return usec / 1e6


def own_unit() -> str | None:
    """The systemd unit whose cgroup we run in (e.g. ublkd@vol0.service)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            path = line.split(":", 2)[2]
            if path.endswith(".service"):
                return path.rsplit("/", 1)[1]
    except (OSError, IndexError):
        pass
    return None


def restart_pending() -> bool:
    """Whether systemd is restarting our own unit right now: a restart job runs
    its stop half first, and its type stays "restart" until that is done."""
    import subprocess  # here: only a stop needs it

    unit = own_unit()
    if unit is None:
        return False
    try:
        jobs = subprocess.run(["systemctl", "list-jobs", "--no-legend", unit],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("cannot ask systemd whether %s is restarting: %s", unit, error)
        return False
    return any(line.split()[1:3] == [unit, "restart"] for line in jobs.splitlines())


class Notifier:
    """sd_notify for one device: READY, STATUS, STOPPING, WATCHDOG.

    Made in the unit's main process (WATCHDOG_PID names it), used by the
    worker it forks as well (the unit has NotifyAccess=all).
    """

    def __init__(self) -> None:
        self.notify_socket = bool(os.environ.get("NOTIFY_SOCKET"))
        self.interval = watchdog_interval()
        # Check health several times per watchdog period, at least once a second.
        self.tick = min(1.0, self.interval / 4) if self.interval else 1.0
        # Backend I/O older than this counts as hung (the watchdog then fires
        # within one period of it); 30 s when no watchdog is set.
        self.stall_limit = self.interval / 2 if self.interval else 30.0
        self.last_ping = 0.0

    @functools.cached_property
    def sd(self) -> sdnotify.SystemdNotifier:
        """Made at the first notification, READY at the earliest: sdnotify
        imports socket and selectors, not needed on the way to a recovery."""
        import sdnotify

        return sdnotify.SystemdNotifier()

    def send(self, message: str) -> None:
        if self.notify_socket:
            self.sd.notify(message)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")
        self.watchdog()

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def watchdog(self) -> None:
        """Ping, at most four times per period (a ping is a syscall; no need for more)."""
        moment = time.monotonic()
        if self.interval and moment - self.last_ping >= self.interval / 4:
            self.send("WATCHDOG=1")
            self.last_ping = moment

    def ensure_stop_order(self, name: str, dev_id: int, backing: str | None) -> None:
        """At shutdown: file systems on /dev/ublkbN go first, then we, then
        the file system that holds the backing file.

        Mount units are ordered After=blockdev@dev-ublkbN.target, so a unit
        Before= that target and After= ublkd@NAME makes systemd unmount,
        then stop us; a unit Before= ublkd@NAME with RequiresMountsFor= the
        backing file keeps its mount until we stopped.  The device number
        and backing path are only known now, so these are transient units
        (PartOf= ours, gone when we stop); a recovered daemon finds them.
        """
        unit = f"ublkd@{name}.service"
        if own_unit() != unit:
            return
        target = f"blockdev@dev-ublkb{dev_id}.target"
        self.transient_unit(
            f"ublkd-order-{name}-ublkb{dev_id}.service",
            f"Order /dev/ublkb{dev_id} of {unit} after its file systems",
            [f"PartOf={unit}", f"After={unit}", f"Wants={target}", f"Before={target}"])
        if backing:
            self.transient_unit(
                f"ublkd-order-{name}-backing.service",
                f"Keep the backing file of {unit} mounted while it runs",
                [f"PartOf={unit}", f"Before={unit}", f"RequiresMountsFor={backing}"])

    @staticmethod
    def transient_unit(name: str, description: str, properties: list[str]) -> None:
        """Start a do-nothing unit whose only job is its dependencies.

        Without default dependencies, as ublkd@ itself: with them it would be
        After=basic.target, hence after every local file system, including
        the one on our device: an ordering cycle.
        """
        import subprocess  # here: the daemon runs this after READY, not before recovering

        if subprocess.run(["systemctl", "is-active", "--quiet", name]).returncode == 0:
            return
        result = subprocess.run(
            ["systemd-run", "--no-block", "--quiet", f"--unit={name}",
             f"--description={description}", "--service-type=oneshot",
             "--property=RemainAfterExit=yes", "--property=DefaultDependencies=no",
             "--property=Conflicts=shutdown.target", "--property=Before=shutdown.target",
             *(f"--property={p}" for p in properties), "/bin/true"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            log.warning("could not start %s (%s): %s", name, description,
                        result.stderr.strip())


def systemd1(unit: str) -> ModuleType:
    """pystemd's systemd1 module, for `unit`'s hand-over.

    Imported here, not at the top: pystemd is an optional dependency (the
    extra "systemd" of a pip install), needed by `ublkd upgrade` only, and
    serving must not pay for importing it.
    """
    try:
        from pystemd import systemd1
    except ImportError:
        raise MissingDependencyError(
            f"{unit}: the hand-over talks to systemd through pystemd, which is not "
            f"installed: install the Debian package python3-pystemd, or `pip install "
            f"'ublkd[systemd]'`"
        ) from None
    return systemd1


def unit_state(unit: str) -> tuple[str, str, int]:
    """(ActiveState, SubState, MainPID) of `unit`, asked over D-Bus (pystemd)."""
    with systemd1(unit).Unit(unit.encode(), _autoload=True) as handle:
        return (handle.Unit.ActiveState.decode(), handle.Unit.SubState.decode(),
                int(handle.Service.MainPID))


def unit_status_text(unit: str) -> str:
    """The STATUS= the service last sent (StatusText)."""
    with systemd1(unit).Unit(unit.encode(), _autoload=True) as handle:
        return handle.Service.StatusText.decode()


def hand_over(unit: str, timeout: float = 120.0,
              pause: Callable[[float], None] = time.sleep) -> None:
    """SIGUSR2 to the unit's daemon, then wait for its successor to be READY.

    The daemon starts the successor from the binary installed now and lets
    go of the device once it is ready; the successor recovers the device and
    becomes the unit's main process (ublkd/succession.py).  A successor that
    failed before it was ready leaves the device with the daemon, whose
    STATUS then says so: HandOverRefusedError.  `pause` waits between polls:
    the D-Bus service passes one that keeps its main loop serving other
    clients meanwhile.
    """
    active, _, old = unit_state(unit)
    if active != "active" or old <= 0:
        raise DeviceNotFoundError(f"{unit} is not running ({active}); nothing to hand over")
    with systemd1(unit).Manager() as manager:
        manager.Manager.KillUnit(unit.encode(), b"main", signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active, sub, pid = unit_state(unit)
        if active == "active" and sub == "running" and pid not in (0, old):
            return
        status = unit_status_text(unit) if pid == old else ""
        if status.startswith(HAND_OVER_FAILED):
            raise HandOverRefusedError(
                f"{unit}: {status} (pid {old}); the new version's error is in "
                f"`journalctl -u {unit}`")
        pause(0.1)
    raise KernelError(
        f"{unit}: no new daemon READY {timeout:.0f} s after the hand-over "
        f"({active}/{sub}); see `journalctl -u {unit}`"
    )
