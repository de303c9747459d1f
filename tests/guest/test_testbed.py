"""The test bed itself: the guest is the machine the other guest tests believe it is."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest

from tests.testbed import Guest, GuestBootError, GuestCommandError, GuestConfig

CHECKOUT = Path(__file__).resolve().parents[2]


def test_kernel_is_debians_6_12(guest, kernel):
    release = guest.run("uname -r").stdout.strip()
    assert release == kernel.version
    assert release.startswith("6.12.") and release.endswith("+deb12-amd64")


def test_pid1_is_systemd(guest):
    assert guest.run("cat /proc/1/comm").stdout.strip() == "systemd"
    assert guest.run("readlink -f /proc/1/exe").stdout.strip() == "/usr/lib/systemd/systemd"


def test_system_is_running_without_failed_units_of_ours(guest):
    state = guest.run("systemctl is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded")
    failed = guest.run("systemctl list-units --failed --plain --no-legend").stdout
    assert "ublkd" not in failed, failed


def test_ublk_driver_is_loaded(guest):
    guest.run("test -c /dev/ublk-control")
    guest.run("test -d /sys/module/ublk_drv")


def test_host_venv_imports_the_project(guest):
    code = "import sys, ublkd; print(ublkd.__file__); print(sys.prefix != sys.base_prefix)"
    out = guest.run([sys.executable, "-c", code], cwd="/").stdout.split()
    assert out == [str(CHECKOUT / "ublkd" / "__init__.py"), "True"]


def test_failing_guest_command_is_a_failure_with_its_output(guest):
    with pytest.raises(GuestCommandError) as failure:
        guest.run("echo to-stdout; echo to-stderr >&2; exit 3")
    message = str(failure.value)
    assert "exited 3" in message
    assert "to-stdout" in message and "to-stderr" in message
    assert str(guest.console_log) in message
    assert guest.run("exit 3", check=False).rc == 3


def test_guest_command_timeout_is_reported(guest):
    result = guest.run("sleep 30", check=False, timeout=2)
    assert result.timed_out


def test_files_round_trip_and_journal_is_readable(guest):
    payload = bytes(range(256)) * 64
    guest.write_file("/tmp/testbed/payload", payload)
    digest = guest.run("sha256sum /tmp/testbed/payload").stdout.split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()
    assert "ublkd-testbed-agent.service" in guest.journal("-u", "ublkd-testbed-agent")
    saved = guest.save_journal()
    assert "systemd" in saved.read_text()


def test_guest_that_panics_fails_fast_with_console_log(kernel, tmp_path):
    machine = Guest(kernel, tmp_path, GuestConfig(kernel_args=["rdinit=/nonexistent"],
                                                  boot_timeout=240))
    started = time.monotonic()
    with pytest.raises(GuestBootError) as failure:
        machine.boot()
    assert time.monotonic() - started < 120
    assert "qemu exited" in str(failure.value)
    assert str(machine.console_log) in str(failure.value)
    assert "Kernel panic" in machine.console_log.read_text(errors="replace")


def test_guest_that_hangs_fails_at_the_boot_timeout(kernel, tmp_path):
    # emergency.target never starts the agent: the boot hangs at a console
    # prompt nobody answers, as a broken boot would.
    machine = Guest(kernel, tmp_path, GuestConfig(kernel_args=["systemd.unit=emergency.target"],
                                                  boot_timeout=8))
    started = time.monotonic()
    with pytest.raises(GuestBootError) as failure:
        machine.boot()
    elapsed = time.monotonic() - started
    assert 8 <= elapsed < 40
    assert "did not answer within 8 s" in str(failure.value)
    assert str(machine.console_log) in str(failure.value)
    assert machine.qemu.poll() is not None  # no qemu left behind
