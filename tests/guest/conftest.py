"""Fixtures for tests that need the real ublk driver and systemd.

One guest boots per test session (`guest`); a failing test gets the paths of
the guest's console log and journal appended to its report, and the next
test a new boot of the guest: one failure must not fail every later test
on its debris, nor spend the CI run's time on their timeouts.  Guest tests
that would start after UBLKD_TEST_BUDGET minutes (default 60) of the run
fail at once instead, so that a run that went wrong still ends with the
summary that says what failed.

Two kernels: every guest test runs on Debian 12's 6.12, and a test marked
`@pytest.mark.kernels("6.12", "6.18")` (or "6.18" alone, for a feature only
the newer driver has) on Debian 13's 6.18 as well.  Each kernel's tests run
together, on one guest at a time.  UBLKD_TESTBED_KERNEL=6.18 runs every
guest test on that kernel only (UBLKD_TESTBED_KERNEL=6.12 likewise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.guest.serving import STATE_DIR, JournalSince, leftovers
from tests.testbed import Guest, GuestConfig, KernelBuild, prepare
from tests.testbed.provision import DEFAULT_KERNEL, KERNEL_LINES

CHECKOUT = Path(__file__).resolve().parents[2]
LOG_ROOT = CHECKOUT / "build" / "testbed"
KEEP_RUNS = 5
IN_USE_SECONDS = 3 * 3600
REPORT: list[str] = []  # measurements shown in the terminal summary (boot times, ...)
BUDGET_SECONDS = float(os.environ.get("UBLKD_TEST_BUDGET", 60)) * 60
RUN_STARTED = time.monotonic()
SPOILED: set[int] = set()  # id() of guests whose last test failed


def new_run_dir() -> Path:
    """A log directory for this run; only the newest KEEP_RUNS are kept.

    A directory younger than IN_USE_SECONDS is never removed: another pytest
    run on the same checkout (a developer's, or make check-fresh's) may be
    writing its guest's disk and logs there.
    """
    LOG_ROOT.mkdir(parents=True, exist_ok=True)
    for old in sorted(LOG_ROOT.glob("run-*"))[:-(KEEP_RUNS - 1)]:
        if time.time() - old.stat().st_mtime > IN_USE_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
    run_dir = LOG_ROOT / time.strftime(f"run-%Y%m%d-%H%M%S-{os.getpid()}")
    run_dir.mkdir()
    return run_dir


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kernels(*lines): the test bed kernels to run this guest test on "
                   "(default: 6.12 only; UBLKD_TESTBED_KERNEL overrides every test's)")


def kernels_for(definition) -> list[str]:
    """The kernel lines a guest test runs on, as the one string object per
    line: pytest keeps a session fixture for the next test only if its
    parameter *is* the same object (an equal string from another module's
    marker made it boot a new guest, 7 times in one run)."""
    forced = os.environ.get("UBLKD_TESTBED_KERNEL")
    marker = definition.get_closest_marker("kernels")
    names = [forced] if forced else list(marker.args) if marker else [DEFAULT_KERNEL]
    for name in names:
        if name not in KERNEL_LINES:
            raise pytest.UsageError(f"unknown test bed kernel {name!r}: choose one of "
                                    f"{', '.join(KERNEL_LINES)} (UBLKD_TESTBED_KERNEL)")
    return [KERNEL_LINES[name].name for name in names]


def pytest_generate_tests(metafunc):
    """One session-wide `kernel_line` parameter: pytest runs each kernel's
    tests together and tears one guest down before it boots the next."""
    if "kernel" in metafunc.fixturenames:
        metafunc.parametrize("kernel_line", kernels_for(metafunc.definition),
                             indirect=True, scope="session")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Each kernel's guest tests in one stretch, 6.12 first: pytest's own
    ordering by fixture parameters does not group a session parameter
    across modules, and every switch of kernel is a guest boot.  A stable
    sort, after pytest's: within a kernel the order stays pytest's."""
    lines = list(KERNEL_LINES)

    def kernel_rank(item) -> int:
        params = getattr(item, "callspec", None)
        line = params.params.get("kernel_line") if params else None
        return 0 if line is None else 1 + lines.index(line)

    items.sort(key=kernel_rank)


@pytest.fixture(scope="session")
def kernel_line(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def kernel(kernel_line: str) -> KernelBuild:
    return prepare(line=kernel_line)


@pytest.fixture(scope="session")
def run_logs() -> Path:
    return new_run_dir()


@pytest.fixture(scope="session")
def guest_logs(run_logs: Path, kernel_line: str) -> Path:
    """This kernel's guest logs, in the run's directory."""
    logs = run_logs / f"kernel-{kernel_line}"
    logs.mkdir(exist_ok=True)
    return logs


@pytest.fixture(scope="session")
def guest(kernel: KernelBuild, guest_logs: Path):
    """The session's guest, with a 1 GiB scratch disk (virtio serial disk0)."""
    disk = guest_logs / "disk0.img"
    subprocess.run(["truncate", "-s", "1G", str(disk)], check=True)
    machine = Guest(kernel, guest_logs, GuestConfig(disks=[disk]))
    machine.boot()
    yield machine
    machine.shutdown()
    disk.unlink(missing_ok=True)
    REPORT.append(
        f"session guest ({kernel.version}): {machine.boots} boot(s), last "
        f"{machine.boot_seconds:.1f} s guest uptime / {machine.boot_wall_seconds:.1f} s wall "
        f"to agent ready; logs in {guest_logs}"
    )


@pytest.fixture(autouse=True)
def guest_rebooted_after_a_failure(request):
    """Every guest test starts within the run's budget, on a guest that the
    previous test left in order (else it is power-cycled first)."""
    if "guest" not in request.fixturenames:
        return
    spent = time.monotonic() - RUN_STARTED
    if spent > BUDGET_SECONDS:
        pytest.fail(f"not started: the run has used {spent / 60:.0f} of its "
                    f"{BUDGET_SECONDS / 60:.0f} minutes (UBLKD_TEST_BUDGET); see the "
                    f"first failures above", pytrace=False)
    machine = request.getfixturevalue("guest")
    if id(machine) in SPOILED:
        machine.power_cycle()
        SPOILED.discard(id(machine))
        REPORT.append(f"guest power-cycled after a failure, before {request.node.nodeid}")


@pytest.fixture
def clean_guest(guest):
    """Each test starts and ends with no ublk device, state or backing file."""
    yield guest
    guest.run("umount -q /mnt/vol0 2>/dev/null; umount -q /mnt/disk0 2>/dev/null; true")
    remaining = leftovers(guest)
    guest.run(f"pkill -TERM -f '[u]blkd serve'; for i in $(seq 50); do "
              f"pgrep -f '[u]blkd serve' >/dev/null || break; sleep 0.1; done; "
              f"rm -f /var/tmp/*.img /etc/ublkd/*.toml; rm -rf {STATE_DIR}; true")
    assert remaining == "", f"left behind: {remaining}"


@pytest.fixture
def units_installed(guest):
    """The checkout's units in the session guest, running its .venv's ublkd;
    installed again after a reboot (test_recovery.py reboots the guest, whose
    /etc is a tmpfs overlay)."""
    guest.run(f"test -f /etc/systemd/system/ublkd@.service || "
              f"make -s -C {CHECKOUT} install-units")
    return guest


@pytest.fixture
def systemd_guest(units_installed):
    """The session guest for a test of ublkd@: stops every unit afterwards, and
    fails the test if a device or state file survived the stop."""
    guest = units_installed
    yield guest
    guest.run("pkill -KILL -x fio; umount -q /mnt/vol0 2>/dev/null; "
              "systemctl stop 'ublkd@*' 'ublkd-giveup@*' "
              "'ublkd-recover@*'; systemctl reset-failed 'ublkd*'; true", timeout=300)
    leftover = guest.run(f"find /sys/class/ublk-char/ {STATE_DIR} -mindepth 1 2>/dev/null; "
                         f"true").stdout.strip()
    guest.run(f"rm -f /var/tmp/*.img* /etc/ublkd/*.toml; rm -rf {STATE_DIR}")
    assert leftover == "", f"left behind after stop: {leftover}"


@pytest.fixture
def journal(systemd_guest) -> JournalSince:
    """The guest's journal from the start of the test on."""
    return JournalSince(systemd_guest)


@pytest.fixture
def report():
    """Call report(line) to show a measurement in the run's summary."""
    return REPORT.append


def pytest_terminal_summary(terminalreporter):
    for line in REPORT:
        terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    machine = item.funcargs.get("guest") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(machine, Guest):
        SPOILED.add(id(machine))
        if machine.agent:
            machine.save_journal()
        report.sections.append(("ublkd test bed logs", machine.where_logs_are()))
