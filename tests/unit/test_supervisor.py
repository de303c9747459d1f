"""The supervisor's process rules, with real forks and signals (no kernel needed).

Each test runs the supervisor in a child process of its own, so its
signal handlers and forks never touch pytest's process.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

from ublkd import succession, supervisor
from ublkd.supervisor import Supervisor


def run_supervisor(tmp_path: Path, work, burst: int = supervisor.RESPAWN_BURST
                   ) -> tuple[int, list[str]]:
    """Run Supervisor(work) in a fresh process; its exit code and status lines."""
    status_file = tmp_path / "status"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            supervisor.RESPAWN_BURST = burst
            lines = status_file.open("a")

            def status(text: str) -> None:
                lines.write(text + "\n")
                lines.flush()

            code = Supervisor("vol0", work, status).run()
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    text = status_file.read_text() if status_file.exists() else ""
    return os.waitstatus_to_exitcode(wait_status), text.splitlines()


def counting_worker(tmp_path: Path, behaviour):
    """A worker that records its pid, then does behaviour(nth start)."""
    starts = tmp_path / "starts"

    def work(_predecessor) -> int:
        with starts.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return behaviour(len(starts.read_text().splitlines()))
    return work, starts


def wait_for(path: Path) -> str:
    """The text a forked process wrote to path, once it is there."""
    deadline = time.monotonic() + 10
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path.read_text()


def test_worker_exit_status_is_the_supervisors(tmp_path):
    work, starts = counting_worker(tmp_path, lambda n: 6)
    code, lines = run_supervisor(tmp_path, work)
    assert code == 6 and lines == []
    assert len(starts.read_text().splitlines()) == 1


def test_a_worker_killed_by_a_signal_is_replaced(tmp_path):
    def behaviour(n: int) -> int:
        if n < 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0
    work, starts = counting_worker(tmp_path, behaviour)
    code, lines = run_supervisor(tmp_path, work)
    pids = starts.read_text().split()
    assert code == 0 and len(pids) == 3 and len(set(pids)) == 3
    assert lines == [f"worker {pids[0]} killed by SIGKILL, recovering",
                     f"worker {pids[1]} killed by SIGKILL, recovering"]


def test_respawns_stop_at_the_burst_and_systemd_takes_over(tmp_path):
    def behaviour(n: int) -> int:
        faulthandler.disable()  # pytest's: no stack dump for a planned crash
        os.kill(os.getpid(), signal.SIGSEGV)
        return 0
    work, starts = counting_worker(tmp_path, behaviour)
    code, _ = run_supervisor(tmp_path, work, burst=2)
    assert code == 128 + signal.SIGSEGV
    assert len(starts.read_text().splitlines()) == 3  # the first and two respawns


def test_sigterm_reaches_the_worker_and_it_is_not_replaced(tmp_path):
    """A stop goes to the worker; it decides (and exits with what it decided)."""
    ready = tmp_path / "ready"

    def work(_predecessor) -> int:
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(0))
        ready.write_text(str(os.getppid()))
        while not got:
            time.sleep(0.01)
        return got[0]

    pid = os.fork()
    if pid == 0:
        os._exit(Supervisor("vol0", work, lambda text: None).run())
    assert int(wait_for(ready)) == pid
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# A stand-in for the new ublkd of a hand-over: reads what the supervisor
# passed, and behaves as argv[1] says.
FAKE_SUCCESSOR = """
import os, sys, time
worker, fd = map(int, os.environ["UBLKD_SUCCESSOR_OF"].split(":"))
open(sys.argv[2], "w").write(f"{worker}")
if sys.argv[1] == "refuse":
    sys.exit(9)
if sys.argv[1] == "stall":
    time.sleep(30)
os.write(fd, b"R")
while os.path.exists(f"/proc/{worker}") and \\
        open(f"/proc/{worker}/stat").read().split(")")[1].split()[0] != "Z":
    time.sleep(0.01)
if sys.argv[1] == "die":
    sys.exit(4)
if sys.argv[1] == "hang":
    time.sleep(30)
os.write(fd, b"T")
time.sleep(30)
"""


def hand_over(tmp_path: Path, mode: str) -> tuple[int, list[str], str, list[str]]:
    """SIGUSR2 to a supervisor whose successor behaves as `mode` says; the
    supervisor's exit code, the worker's log, what the successor saw, the
    status lines.  A worker that gets SIGUSR2 exits 75; SIGTERM, 0."""
    log, seen, script = tmp_path / "worker-log", tmp_path / "seen", tmp_path / "succ.py"
    script.write_text(FAKE_SUCCESSOR)
    status_file = tmp_path / "status"

    def work(_predecessor) -> int:
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(0))
        signal.signal(signal.SIGUSR2, lambda s, f: got.append(75))
        log.write_text("serving\n")
        while not got:
            time.sleep(0.01)
        with log.open("a") as f:
            f.write(f"signal {got[0]}\n")
        return got[0]

    def status(text: str) -> None:
        with status_file.open("a") as f:
            f.write(text + "\n")

    argv = [sys.executable, str(script), mode, str(seen)]
    pid = os.fork()
    if pid == 0:
        # Short only where the test waits it out: elsewhere a loaded host
        # (CI, 2 cores) once took over 2 s to run the fake successor.
        succession.TAKE_OVER_TIMEOUT = 2.0 if mode == "hang" else 60.0
        succession.READY_TIMEOUT = 2.0 if mode == "stall" else 60.0
        os._exit(Supervisor("vol0", work, status, successor_argv=lambda: argv).run())
    wait_for(log)
    os.kill(pid, signal.SIGUSR2)
    if mode in ("refuse", "stall"):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                status_file.exists() and "hand-over failed" in status_file.read_text()):
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)
    _, wait_status = os.waitpid(pid, 0)
    os.system(f"pkill -f {script}")
    statuses = status_file.read_text().splitlines() if status_file.exists() else []
    return os.waitstatus_to_exitcode(wait_status), log.read_text().split("\n"), \
        seen.read_text(), statuses


def test_a_hand_over_starts_the_successor_before_the_worker_lets_go(tmp_path):
    code, worker_log, seen, statuses = hand_over(tmp_path, "take")
    assert code == 0 and worker_log[:2] == ["serving", "signal 75"]
    assert len(statuses) == 1 and statuses[0].startswith("handing over to ublkd pid ")
    assert seen.split()[0].isdigit()  # the worker it takes over from


def test_a_successor_that_cannot_take_over_leaves_the_worker_serving(tmp_path):
    code, worker_log, _, statuses = hand_over(tmp_path, "refuse")
    # The worker never saw SIGUSR2; the stop after it is a normal stop.
    assert code == 0 and worker_log[:2] == ["serving", "signal 0"]
    assert statuses[1:] == ["hand-over failed: the new ublkd exited with 9; still serving"]


def test_a_successor_that_dies_after_the_worker_let_go_leaves_it_to_systemd(tmp_path):
    code, worker_log, _, _ = hand_over(tmp_path, "die")
    assert code == 75 and worker_log[:2] == ["serving", "signal 75"]


def test_a_successor_that_hangs_is_killed_and_left_to_systemd(tmp_path):
    started = time.monotonic()
    code, worker_log, _, _ = hand_over(tmp_path, "hang")
    assert code == 75 and worker_log[:2] == ["serving", "signal 75"]
    assert time.monotonic() - started < 20  # TAKE_OVER_TIMEOUT (2 s here), not the 30 s hang


def test_a_successor_that_never_gets_ready_is_killed_and_the_worker_serves_on(tmp_path):
    """Before R it holds nothing of the device: killed after READY_TIMEOUT
    (2 s here), never waited for until the unit stops."""
    started = time.monotonic()
    code, worker_log, seen, statuses = hand_over(tmp_path, "stall")
    assert code == 0 and worker_log[:2] == ["serving", "signal 0"]  # SIGTERM, never SIGUSR2
    assert time.monotonic() - started < 20  # not the successor's 30 s stall
    assert seen.isdigit()  # it was started, and read whom it succeeds
    assert statuses[-1] == "hand-over failed: the new ublkd was not ready within 2 s; " \
                           "still serving", statuses


def test_the_worker_dies_with_its_parent(tmp_path):
    worker_pid = tmp_path / "worker"

    def work(_predecessor) -> int:
        worker_pid.write_text(str(os.getpid()))
        time.sleep(60)
        return 0

    pid = os.fork()
    if pid == 0:
        os._exit(Supervisor("vol0", work, lambda text: None).run())
    worker = int(wait_for(worker_pid))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # reaped by init (or a subreaper) once killed
    assert not Path(f"/proc/{worker}").exists() or \
        Path(f"/proc/{worker}/stat").read_text().split(")")[1].split()[0] == "Z"
