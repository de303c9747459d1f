"""What ublkd refuses to do to a device or with a config (issue 15), and the
unit's reduced capabilities, under systemd in the guest.

- `ublkd upgrade` of a device whose recovery mode would not survive a
  hand-over ("none": the kernel removes it; "abort": its held I/O fails)
  is refused with exit 9, and the device, its number, its mount and its
  daemon are untouched, whatever the config says since.
- A config another user could change is refused with exit 2, and systemd
  does not restart the unit (RestartPreventExitStatus=2).
- The unit's CapabilityBoundingSet= (CAP_SYS_ADMIN, CAP_DAC_OVERRIDE) is
  what the daemon runs with, and enough to create, serve and recover.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.guest.serving import (FioThroughExt4, kill_and_wait_live,
                                 kill_worker_and_time_first_read, leftovers, show, start,
                                 ublkd, wait_in_guest, write_config)

BACKING = "/var/tmp/vol0.img"
CONFIG = f'backend = "file"\npath = "{BACKING}"\nsize = "256MiB"\n'
CONFIG_FILE = "/etc/ublkd/vol0.toml"
CAP_DAC_OVERRIDE, CAP_SYS_ADMIN = 1, 21


@pytest.mark.parametrize("mode", ["none", "abort"])
def test_upgrade_refuses_a_device_that_would_not_survive_it(systemd_guest, journal, mode):
    guest = systemd_guest
    status = start(guest, "vol0", CONFIG + f'recovery = "{mode}"\n')
    unit = show(guest, "ublkd@vol0", "MainPID", "NRestarts")
    app = FioThroughExt4(guest, status["device"])
    # The config says "reissue" now; the device was created otherwise.
    write_config(guest, "vol0", CONFIG + 'recovery = "reissue"\n')
    guest.run("sleep 2")
    refused = ublkd(guest, "upgrade", "vol0", check=False, timeout=180)
    assert refused.rc == 9, refused.describe()
    assert f'vol0: not handed over: {status["device"]} was created with recovery = "{mode}"' \
        in refused.stderr, refused.stderr
    assert "until its next planned restart" in refused.stderr, refused.stderr
    app.finish()  # fio verified, same major:minor, still mounted, e2fsck clean
    assert show(guest, "ublkd@vol0", "MainPID", "NRestarts") == unit
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert (after["pid"], after["generation"]) == (status["pid"], status["generation"])
    assert "SIGUSR2" not in journal.of("ublkd@vol0")


@pytest.mark.parametrize("unsafe, culprit, problem", [
    (f"chmod 664 {CONFIG_FILE}", CONFIG_FILE, "it is writable by its group (mode 0664"),
    (f"chown nobody {CONFIG_FILE}", CONFIG_FILE, "it is owned by uid 65534 (nobody), not by "
                                                 "root (mode 0644)"),
    ("chmod 775 /etc/ublkd", "/etc/ublkd", "its directory /etc/ublkd is writable by its "
                                           "group (mode 0775"),
], ids=["group-writable", "other-owner", "writable-directory"])
def test_unsafe_config_is_refused_without_a_restart(systemd_guest, journal, unsafe, culprit,
                                                    problem):
    guest = systemd_guest
    write_config(guest, "vol0", CONFIG)
    guest.run(unsafe)
    try:
        started = guest.run("timeout 120 systemctl start ublkd@vol0", check=False, timeout=180)
        assert started.rc != 0, started.describe()
        wait_in_guest(guest, "systemctl is-failed -q ublkd@vol0", 60)
        assert show(guest, "ublkd@vol0", "ExecMainStatus", "NRestarts") == \
            {"ExecMainStatus": "2", "NRestarts": "0"}
        log = journal.of("ublkd@vol0")
        assert f"{CONFIG_FILE}: refusing to read it: {problem}" in log, log
        assert f"Fix: chown root:root {culprit}; chmod go-w {culprit}" in log, log
        assert leftovers(guest) == ""
    finally:
        guest.run("chmod 755 /etc/ublkd")


def test_reduced_capabilities_create_serve_and_recover(systemd_guest, journal):
    guest = systemd_guest
    status = start(guest, "vol0", CONFIG)
    dev = status["device"]
    wanted = (1 << CAP_SYS_ADMIN) | (1 << CAP_DAC_OVERRIDE)
    main = show(guest, "ublkd@vol0", "MainPID")["MainPID"]
    for pid in (main, status["pid"]):  # the main process and the worker
        caps = dict(re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$",
                               guest.read_file(f"/proc/{pid}/status"), re.M))
        assert int(caps["CapBnd"], 16) == wanted and int(caps["CapEff"], 16) == wanted, caps
    app = FioThroughExt4(guest, dev)
    guest.run("sleep 2")
    kill_worker_and_time_first_read(guest, "vol0", dev)
    guest.run("sleep 2")
    kill_and_wait_live(guest, "vol0")
    app.finish()
    assert len(re.findall(rf"vol0: recovered {dev}", journal.of("ublkd@vol0"))) == 2
