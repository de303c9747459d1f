"""The supervisor's process rules, with real forks and signals (no kernel needed).

Each test runs the supervisor in a child process of its own, so its
signal handlers and forks never touch pytest's process.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

import pytest

from ublkd import supervisor
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

    def work() -> int:
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


@pytest.mark.parametrize("signum, expected", [(signal.SIGTERM, 0), (signal.SIGUSR2, 75)])
def test_signals_reach_the_worker_and_it_is_not_replaced(tmp_path, signum, expected):
    """SIGTERM (stop) and SIGUSR2 (hand over) go to the worker; it decides."""
    ready = tmp_path / "ready"

    def work() -> int:
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(0))
        signal.signal(signal.SIGUSR2, lambda s, f: got.append(75))
        ready.write_text(str(os.getppid()))
        while not got:
            time.sleep(0.01)
        return got[0]

    pid = os.fork()
    if pid == 0:
        os._exit(Supervisor("vol0", work, lambda text: None).run())
    assert int(wait_for(ready)) == pid
    os.kill(pid, signum)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == expected


def test_the_worker_dies_with_its_parent(tmp_path):
    worker_pid = tmp_path / "worker"

    def work() -> int:
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
