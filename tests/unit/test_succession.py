"""The successor's side of a hand-over: what it takes from its environment."""

from __future__ import annotations

import os
import sys

from ublkd import succession


def test_the_predecessor_comes_out_of_the_environment_once(monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setenv(succession.ENVIRONMENT, f"4242:{write_end}")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    predecessor = succession.predecessor_from_environment()
    assert (predecessor.pid, predecessor.fd) == (4242, write_end)
    # Not for later processes: forked workers after a kill recover normally.
    assert succession.ENVIRONMENT not in os.environ
    assert not os.get_inheritable(write_end)
    # The watchdog is this process's now (the Notifier checks WATCHDOG_PID).
    assert os.environ["WATCHDOG_PID"] == str(os.getpid())
    predecessor.say(succession.READY)
    predecessor.close()
    assert os.read(read_end, 8) == b"R"
    assert succession.predecessor_from_environment() is None
    os.close(read_end)


def test_the_successor_runs_the_command_installed_now(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/ublkd", "serve", "vol0"])
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    assert succession.successor_argv() == ["/usr/bin/ublkd", "serve", "vol0"]
    monkeypatch.setattr(sys, "argv", ["/x/ublkd/__main__.py", "serve", "vol0"])
    assert succession.successor_argv() == [sys.executable, "-m", "ublkd", "serve", "vol0"]
