"""Recovery gap, measured inside the guest: kill -9 to the first completed I/O after.

    python -m benchmarks.recovery_gap --ublkd PATH --name NAME --device /dev/ublkbN
                                      --kills N [--kill worker|main|unit]

Runs in the guest (benchmarks/bench.py starts it): keeps one reader doing
4 KiB O_DIRECT reads on the device, and N times kill -9s

  worker  the worker that serves (its pid from the state file), under a
          `ublkd serve NAME` this script starts; `ublkd serve`'s first
          process forks a new worker, which recovers the device. It does
          that at most RESPAWN_BURST times per RESPAWN_WINDOW (then it
          leaves the device to systemd), so after every RESPAWN_BURST kills
          the script waits for the window to pass;
  main    `ublkd serve` itself (its worker dies with it); this script starts
          `ublkd serve NAME` again at once, as systemd's Restart= would
          without its RestartSec= delay: a whole new Python process;
  unit    the whole unit ublkd@NAME (`systemctl kill -s KILL`: main process
          and worker at once, as the OOM killer of the cgroup does);
          systemd restarts it after RestartSec=, a whole new Python process.
          Before each kill `systemctl reset-failed` clears the unit's start
          limit (8 starts in 5 minutes), which 20 kills would reach.

and takes the time from the kill (for unit: from running `systemctl kill`)
to the first read that completes after the killed processes are gone,
which only their successor can have served. For unit it also takes the
time from the kill until systemd has the unit active again with a new
main process (its ActiveEnterTimestampMonotonic, the same clock).
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

from ublkd.supervisor import RESPAWN_BURST, RESPAWN_WINDOW

BLOCK = 4096


class Reader:
    """One O_DIRECT 4 KiB read after the other, at random offsets."""

    def __init__(self, device: str):
        self.fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.buffer = mmap.mmap(-1, BLOCK)
        self.last_done = 0.0  # time.monotonic() of the latest completed read
        self.reads = 0
        self.errors: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        blocks = self.size // BLOCK
        while not self.done.is_set():
            offset = random.randrange(blocks) * BLOCK
            try:
                os.preadv(self.fd, [self.buffer], offset)
            except OSError as exc:
                self.errors.append(f"{time.monotonic():.3f}: {exc}")
                time.sleep(0.01)
                continue
            self.reads += 1
            self.last_done = time.monotonic()

    def completed_after(self, moment: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            if self.last_done > moment:
                return self.last_done
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.001)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)
        if not self.thread.is_alive():
            os.close(self.fd)


def serve(ublkd: str, name: str, log_path: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([ublkd, "serve", name], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)


def serving_pid(state_dir: str, name: str) -> int:
    with open(os.path.join(state_dir, f"{name}.json")) as state:
        return json.load(state)["pid"]


def wait_gone(pid: int) -> None:
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.001)


def wait_for_respawn_budget(kills: deque[float]) -> None:
    """Keep the worker kills within the supervisor's limit: one more would make
    `ublkd serve` give the device up, and the gap measured would be ours."""
    if len(kills) < RESPAWN_BURST:
        return
    oldest = kills[-RESPAWN_BURST]
    time.sleep(max(0.0, oldest + RESPAWN_WINDOW + 1.0 - time.monotonic()))


def delete_device(ublkd: str, name: str, reader: Reader) -> None:
    """After a failure with no server left: delete the quiesced device, which
    fails the read the reader is stuck in (the process could not even exit)."""
    deleting = subprocess.Popen([ublkd, "delete", name])
    reader.stop()  # closes /dev/ublkbN, which DEL_DEV waits for
    deleting.wait(120)


def wait_readable(device: str, server: Direct | Unit, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    buffer = mmap.mmap(-1, BLOCK)
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"{device} not readable: {server.describe()}")
        try:
            fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            time.sleep(0.1)
            continue
        try:
            os.preadv(fd, [buffer], 0)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            os.close(fd)
    raise RuntimeError(f"{device} not readable after {timeout} s")


class Direct:
    """`ublkd serve NAME` started by this script, no systemd (kinds worker and main)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.process = serve(args.ublkd, args.name, args.log)
        self.worker_kills: deque[float] = deque()

    def running(self) -> bool:
        return self.process.poll() is None

    def describe(self) -> str:
        how = "running" if self.running() else f"exited {self.process.returncode}"
        return (f"ublkd serve: {how}"
                f"; log {self.args.log}")

    def kill(self) -> tuple[float, float]:
        """Kill -9 the worker or `ublkd serve`; (moment of the kill, moment it was gone)."""
        if self.args.kill == "worker":
            wait_for_respawn_budget(self.worker_kills)
            worker = serving_pid(self.args.state_dir, self.args.name)
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            wait_gone(worker)
            self.worker_kills.append(time.monotonic())
            return killed, self.worker_kills[-1]
        killed = time.monotonic()
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        dead = time.monotonic()
        self.process = serve(self.args.ublkd, self.args.name, self.args.log)
        return killed, dead

    def active_after(self, killed: float) -> float | None:
        """Only systemd has a notion of "active again"."""
        return None

    def stop(self, reader: Reader) -> None:
        if not self.running():
            delete_device(self.args.ublkd, self.args.name, reader)
            return
        reader.stop()  # first: an open /dev/ublkbN would hold up the daemon's DEL_DEV
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.args.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        with open(self.args.log, errors="replace") as log:
            return log.read()


class Unit:
    """ublkd@NAME under systemd (kind unit), killed whole with `systemctl kill -s KILL`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.unit = f"ublkd@{args.name}.service"
        self.since = time.time()
        self.main = 0  # the main pid killed last
        reset_failed(self.unit)
        systemctl("start", self.unit)  # Type=notify: returns once the device is LIVE

    def show(self, prop: str) -> str:
        return systemctl("show", "-p", prop, "--value", self.unit).strip()

    def running(self) -> bool:
        return self.show("ActiveState") == "active"

    def describe(self) -> str:
        return (f"{self.unit}: {self.show('ActiveState')}/{self.show('SubState')}, main pid "
                f"{self.show('MainPID')}; see journalctl -u {self.unit}")

    def kill(self) -> tuple[float, float]:
        """SIGKILL to every process of the unit; (moment of the kill, moment all were gone)."""
        reset_failed(self.unit)
        self.main = int(self.show("MainPID"))
        worker = serving_pid(self.args.state_dir, self.args.name)
        killed = time.monotonic()
        systemctl("kill", "-s", "KILL", self.unit)
        wait_gone(self.main)
        wait_gone(worker)
        return killed, time.monotonic()

    def active_after(self, killed: float) -> float | None:
        """Seconds from the kill until the unit was active again with a new main process."""
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            if self.running() and int(self.show("MainPID")) not in (0, self.main):
                return int(self.show("ActiveEnterTimestampMonotonic")) / 1e6 - killed
            time.sleep(0.1)
        return None

    def stop(self, reader: Reader) -> None:
        if self.running():
            reader.stop()  # first, as for Direct
            systemctl("stop", self.unit)
        else:  # systemd gave up, or a restart is pending: no more restarts, then delete
            systemctl("stop", self.unit)
            delete_device(self.args.ublkd, self.args.name, reader)
        reset_failed(self.unit)

    def log(self) -> str:
        return output("journalctl", "-q", "--no-pager", "-o", "cat", "-u", self.unit,
                      f"--since=@{self.since:.0f}")


def systemctl(*args: str) -> str:
    return output("systemctl", *args)


def reset_failed(unit: str) -> None:
    """NRestarts and the start limit back to 0; fails (ignored) on a unit never started."""
    subprocess.run(["systemctl", "reset-failed", unit], check=False, capture_output=True)


def output(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ublkd", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kill", choices=("worker", "main", "unit"), default="worker")
    parser.add_argument("--state-dir", default="/var/lib/ublkd")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of I/O between a recovery and the next kill")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--log", default="/var/tmp/recovery-gap-ublkd.log")
    args = parser.parse_args(argv)

    server = Unit(args) if args.kill == "unit" else Direct(args)
    wait_readable(args.device, server, args.timeout)
    reader = Reader(args.device)
    reader.start()
    gaps: list[float] = []
    reaped: list[float] = []
    active: list[float] = []
    failure = None
    try:
        for _ in range(args.kills):
            time.sleep(args.settle)
            if reader.completed_after(time.monotonic() - args.settle, 0) is None:
                failure = "no I/O completed before the kill"
                break
            killed, dead = server.kill()
            first = reader.completed_after(dead, args.timeout)
            if first is None:
                failure = (f"no I/O completed within {args.timeout} s of the kill "
                           f"({server.describe()})")
                break
            gaps.append(first - killed)
            reaped.append(dead - killed)
            back = server.active_after(killed)
            if back is not None:
                active.append(back)
    finally:
        server.stop(reader)
    # The daemon times its own recovery (START_USER_RECOVERY .. END); the rest
    # of a gap is the kernel noticing the death and the new process starting.
    recover = [float(m) for m in re.findall(r"recovered /dev/ublkb\d+ in ([0-9.]+) s",
                                            server.log())]
    result = {
        "kill": args.kill,
        "kills": len(gaps),
        "daemon_recover_s": recover[-len(gaps):] if gaps else [],
        "gaps_s": [round(g, 4) for g in gaps],
        "reaped_s": [round(r, 4) for r in reaped],
        "active_s": [round(a, 4) for a in active],
        "min_s": min(gaps) if gaps else None,
        "median_s": statistics.median(gaps) if gaps else None,
        "max_s": max(gaps) if gaps else None,
        "reads": reader.reads,
        "read_errors": reader.errors[:20],
        "failure": failure,
    }
    json.dump(result, sys.stdout)
    print()
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
