"""Recovery gap, measured inside the guest: kill -9 to the first completed I/O after.

    python -m benchmarks.recovery_gap --ublkd PATH --name NAME --device /dev/ublkbN
                                      --kills N [--kill worker|main]

Runs in the guest (benchmarks/bench.py starts it): starts `ublkd serve NAME`
itself, keeps one reader doing 4 KiB O_DIRECT reads on the device, and N
times kill -9s

  worker  the worker that serves (its pid from the state file); `ublkd
          serve`'s first process forks a new one, which recovers the device.
          It does that at most RESPAWN_BURST times per RESPAWN_WINDOW (then
          it leaves the device to systemd), so after every RESPAWN_BURST
          kills the script waits for the window to pass;
  main    `ublkd serve` itself (its worker dies with it); this script starts
          `ublkd serve NAME` again at once, as systemd's Restart= would
          without its RestartSec= delay: a whole new Python process.

and takes the time from the kill to the first read that completes after
the killed process is gone, which only its successor can have served.
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


def wait_readable(device: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    buffer = mmap.mmap(-1, BLOCK)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ublkd serve exited with {process.returncode} before "
                               f"{device} was readable")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ublkd", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kill", choices=("worker", "main"), default="worker")
    parser.add_argument("--state-dir", default="/var/lib/ublkd")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of I/O between a recovery and the next kill")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--log", default="/var/tmp/recovery-gap-ublkd.log")
    args = parser.parse_args(argv)

    process = serve(args.ublkd, args.name, args.log)
    wait_readable(args.device, process, args.timeout)
    reader = Reader(args.device)
    reader.start()
    gaps: list[float] = []
    reaped: list[float] = []
    worker_kills: deque[float] = deque()
    failure = None
    try:
        for _ in range(args.kills):
            time.sleep(args.settle)
            if reader.completed_after(time.monotonic() - args.settle, 0) is None:
                failure = "no I/O completed before the kill"
                break
            if args.kill == "worker":
                wait_for_respawn_budget(worker_kills)
                worker = serving_pid(args.state_dir, args.name)
                killed = time.monotonic()
                os.kill(worker, signal.SIGKILL)
                wait_gone(worker)
                dead = time.monotonic()
                worker_kills.append(dead)
            else:
                killed = time.monotonic()
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                dead = time.monotonic()
                process = serve(args.ublkd, args.name, args.log)
            first = reader.completed_after(dead, args.timeout)
            if first is None:
                failure = (f"no I/O completed within {args.timeout} s of the kill "
                           f"(ublkd serve: {'exited ' + str(process.poll()) if process.poll() is not None else 'running'}; "
                           f"log {args.log})")
                break
            gaps.append(first - killed)
            reaped.append(dead - killed)
    finally:
        if process.poll() is not None:
            delete_device(args.ublkd, args.name, reader)
        else:
            reader.stop()  # first: an open /dev/ublkbN would hold up the daemon's DEL_DEV
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(args.timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # The daemon times its own recovery (START_USER_RECOVERY .. END); the rest
    # of a gap is the kernel noticing the death and the new process starting.
    with open(args.log, errors="replace") as log:
        recover = [float(m) for m in re.findall(r"recovered /dev/ublkb\d+ in ([0-9.]+) s", log.read())]
    result = {
        "kill": args.kill,
        "kills": len(gaps),
        "daemon_recover_s": recover[-len(gaps):] if gaps else [],
        "gaps_s": [round(g, 4) for g in gaps],
        "reaped_s": [round(r, 4) for r in reaped],
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
