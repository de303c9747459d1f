"""The D-Bus API (org.ublkd1) on the guest's real system bus, with polkit.

Each test calls it as a user would: `busctl` as root, a pydbus client
(tests/guest/dbus_client.py) as root or as nobody, and checks the result
where a user would see it: `ublkd status --json`, `systemctl show`, the
block device, the bytes on it.  The bus starts ublkd-dbus.service on the
first call (bus activation), as on an installed system.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.serving import (CHECKOUT, device_status, devnum, kill_and_wait_live,
                                 run_in_background, show, start, wait_in_guest, write_config)

BACKING = "/var/tmp/vol0.img"
CONFIG = f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n'
MANAGER = "org.ublkd1 /org/ublkd1/Manager org.ublkd1.Manager"
# The client is copied where every user can read it: the checkout may be
# in a directory only root may enter (make check-fresh clones into a mktemp
# directory, mode 0700), and `nobody` runs it too.
CLIENT_PATH = "/run/ublkd-test/dbus_client.py"
CLIENT = f"/usr/bin/python3 {CLIENT_PATH}"


def busctl(guest, method: str, name: str, timeout: float = 180):
    return guest.run(f"busctl --timeout={int(timeout)} call {MANAGER} {method} s {name}",
                     timeout=timeout + 60)


def client(guest, *args: str, user: str = "root") -> dict:
    as_user = "" if user == "root" else f"runuser -u {user} -- "
    return json.loads(guest.run(f"{as_user}{CLIENT} {' '.join(args)}", timeout=120).stdout)


def assert_properties_match_status(guest, name: str, properties: dict) -> None:
    row = device_status(guest, name)
    assert properties["Name"] == name
    assert properties["State"] == row["state"]
    assert properties["Id"] == row["id"]
    assert properties["BlockDevice"] == row["device"]
    assert properties["ServerPid"] == (row["pid"] if row["state"] == "LIVE" else 0)
    assert properties["Backend"] == row["backend"]
    assert properties["Target"] == row["path"]
    assert properties["Size"] == row["size_bytes"] == 64 << 20
    assert properties["RecoveryMode"] == row["recovery"]
    assert properties["Generation"] == row["generation"]
    assert properties["Recoveries"] == row["generation"] - 1
    assert properties["UnitActiveState"] == show(guest, f"ublkd@{name}",
                                                 "ActiveState")["ActiveState"]


@pytest.fixture
def dbus_guest(systemd_guest):
    """A guest with the bus files installed and no device configured yet."""
    guest = systemd_guest
    guest.run(f"truncate -s 64M {BACKING}")
    guest.write_file(CLIENT_PATH, (CHECKOUT / "tests/guest/dbus_client.py").read_text())
    guest.run(f"chmod 0755 {CLIENT_PATH.rsplit('/', 1)[0]}")
    return guest


def test_introspection_documents_both_interfaces(dbus_guest):
    guest = dbus_guest
    manager = guest.run("busctl introspect org.ublkd1 /org/ublkd1/Manager").stdout
    for method in ("ListDevices", "Start", "Stop", "Recover", "Upgrade"):
        assert f".{method} " in manager, manager
    xml = guest.run("busctl introspect --xml-interface org.ublkd1 /org/ublkd1/Manager").stdout
    assert xml.count('name="org.gtk.GDBus.DocString"') >= 6, xml
    write_config(guest, "vol0", CONFIG)
    introspect_device = "busctl introspect org.ublkd1 /org/ublkd1/devices/vol0"
    # The service publishes a new config's object once its directory watch
    # fires, a moment after the write (a CI-path run introspected first).
    wait_in_guest(guest, f"{introspect_device} | grep -q '\\.Name '", 30)
    device = guest.run(introspect_device).stdout
    for prop in ("Name", "BlockDevice", "Id", "State", "Backend", "Target", "Size",
                 "RecoveryMode", "Generation", "Recoveries", "ServerPid", "UnitActiveState"):
        assert f".{prop} " in device and "emits-change" in device, device


def test_root_lists_starts_upgrades_and_stops_through_systemd(dbus_guest):
    guest = dbus_guest
    write_config(guest, "vol0", CONFIG)
    listed = guest.run(f"busctl call {MANAGER} ListDevices").stdout
    assert '"/org/ublkd1/devices/vol0"' in listed, listed
    before = client(guest, "props", "vol0")
    assert (before["State"], before["BlockDevice"], before["UnitActiveState"]) == \
        ("gone", "", "inactive")

    busctl(guest, "Start", "vol0")
    assert show(guest, "ublkd@vol0", "ActiveState")["ActiveState"] == "active"
    started = client(guest, "props", "vol0")
    assert started["State"] == "LIVE"
    assert_properties_match_status(guest, "vol0", started)
    dev = started["BlockDevice"]
    guest.run(f"echo ublkd-dbus | dd of={dev} bs=4096 conv=sync oflag=direct status=none")
    number = devnum(guest, dev)

    busctl(guest, "Upgrade", "vol0")
    upgraded = client(guest, "props", "vol0")
    assert upgraded["ServerPid"] != started["ServerPid"]
    assert upgraded["Recoveries"] == started["Recoveries"] + 1
    assert_properties_match_status(guest, "vol0", upgraded)
    assert devnum(guest, dev) == number
    assert guest.run(f"timeout 60 dd if={dev} bs=4096 count=1 iflag=direct status=none | "
                     f"head -c 10").stdout == "ublkd-dbus"

    busctl(guest, "Stop", "vol0")
    assert show(guest, "ublkd@vol0", "ActiveState", "Result") == \
        {"ActiveState": "inactive", "Result": "success"}
    assert guest.run(f"test -e {dev}", check=False).rc == 1
    stopped = client(guest, "props", "vol0")
    assert (stopped["State"], stopped["UnitActiveState"]) == ("gone", "inactive")


def test_an_unknown_or_invalid_name_is_an_error_that_says_so(dbus_guest):
    guest = dbus_guest
    missing = client(guest, "call", "Start", "nosuch")
    assert missing["error"] == "org.ublkd1.Error.DeviceNotFound", missing
    assert "/etc/ublkd/nosuch.toml" in missing["message"]
    invalid = client(guest, "call", "Stop", "../etc")
    assert invalid["error"] == "org.ublkd1.Error.Config", invalid
    assert show(guest, "ublkd@nosuch", "ActiveState")["ActiveState"] == "inactive"


def test_an_unprivileged_user_reads_but_is_refused_stop(dbus_guest):
    guest = dbus_guest
    start(guest, "vol0", CONFIG)
    restarts = show(guest, "ublkd@vol0", "NRestarts")
    as_root = client(guest, "props", "vol0")
    as_nobody = client(guest, "props", "vol0", user="nobody")
    assert as_nobody == as_root and as_nobody["State"] == "LIVE"
    for method in ("Stop", "Upgrade", "Recover", "Start"):
        refused = client(guest, "call", method, "vol0", user="nobody")
        assert refused["error"] == "org.freedesktop.DBus.Error.AccessDenied", refused
        assert "org.ublkd1.manage" in refused["message"] and "uid 65534" in refused["message"]
    assert client(guest, "props", "vol0") == as_root  # same daemon, still LIVE
    assert show(guest, "ublkd@vol0", "NRestarts") == restarts
    assert device_status(guest, "vol0")["pid"] == as_root["ServerPid"]


def test_a_polkit_rule_can_allow_one_device_to_a_user(dbus_guest):
    """The check's details name the device: a rule lets nobody stop vol0 only."""
    guest = dbus_guest
    rule = "/etc/polkit-1/rules.d/50-ublkd-test.rules"
    guest.write_file(rule, """polkit.addRule(function(action, subject) {
    if (action.id == "org.ublkd1.manage" && subject.user == "nobody" &&
        action.lookup("name") == "vol0" && action.lookup("method") == "Stop")
        return polkit.Result.YES;
});
""")
    try:
        dev = start(guest, "vol0", CONFIG)["device"]
        write_config(guest, "vol1", CONFIG.replace("vol0.img", "vol1.img"))
        guest.run("truncate -s 64M /var/tmp/vol1.img")
        refused = client(guest, "call", "Start", "vol1", user="nobody")
        assert refused["error"] == "org.freedesktop.DBus.Error.AccessDenied", refused
        assert show(guest, "ublkd@vol1", "ActiveState")["ActiveState"] == "inactive"
        # polkitd reads new rules when it notices the file: allow it a moment.
        wait_in_guest(guest, f"runuser -u nobody -- {CLIENT} call Stop vol0 | grep -q '\"ok\"'",
                      30)
        assert show(guest, "ublkd@vol0", "ActiveState", "Result") == \
            {"ActiveState": "inactive", "Result": "success"}
        assert guest.run(f"test -e {dev}", check=False).rc == 1
    finally:
        guest.run(f"rm -f {rule}")


def test_a_killed_daemon_is_seen_as_signals_and_recovered(dbus_guest, report):
    """A subscribed client sees the crash and the recovery as PropertiesChanged
    signals, without polling: the server pid changes, State is LIVE again and
    Recoveries is one more."""
    guest = dbus_guest
    start(guest, "vol0", CONFIG)
    before = client(guest, "props", "vol0")
    guest.run("rm -f /tmp/watch.out")
    watcher, box = run_in_background(
        guest, f"{CLIENT} watch vol0 120 {before['Recoveries'] + 1} > /tmp/watch.out 2>&1")
    wait_in_guest(guest, "grep -q SUBSCRIBED /tmp/watch.out", 60,
                  explain=lambda: guest.run("cat /tmp/watch.out", check=False).stdout)
    killed_at = float(guest.run("/usr/bin/python3 -c 'import time; print(time.monotonic())'")
                      .stdout)
    kill_and_wait_live(guest, "vol0", who="main")
    watcher.join(240)
    output = guest.read_file("/tmp/watch.out")
    assert box and box[0].rc == 0, output
    signals = [json.loads(line) for line in output.splitlines()[1:]]
    pids = [s["changed"]["ServerPid"] for s in signals if "ServerPid" in s["changed"]]
    states = [s["changed"]["State"] for s in signals if "State" in s["changed"]]
    recoveries = [s["changed"]["Recoveries"] for s in signals if "Recoveries" in s["changed"]]
    assert pids and pids[-1] not in (0, before["ServerPid"]), signals
    assert states and states[-1] == "LIVE", signals
    assert "QUIESCED" in states or 0 in pids, signals  # the crash itself was seen
    assert recoveries == [before["Recoveries"] + 1], signals
    after = client(guest, "props", "vol0")
    assert after["ServerPid"] == pids[-1]
    assert_properties_match_status(guest, "vol0", after)
    lags = ", ".join(f"+{s['t'] - killed_at:.2f}" for s in signals)
    report(f"D-Bus: signals after kill -9 of the daemon (guest s, about): {lags}; "
           f"changed: {[sorted(s['changed']) for s in signals]}")


def test_recover_brings_back_a_device_kept_after_systemd_gave_up(dbus_guest):
    guest = dbus_guest
    guest.run("mkdir -p /run/systemd/system/ublkd@vol0.service.d && printf "
              "'[Service]\\nRestart=no\\n' > /run/systemd/system/ublkd@vol0.service.d/"
              "no-restart.conf && systemctl daemon-reload")
    try:
        status_ = start(guest, "vol0", CONFIG + 'on_give_up = "keep"\n')
        dev = status_["device"]
        guest.run(f"echo kept | dd of={dev} bs=4096 conv=sync oflag=direct status=none")
        busy = client(guest, "call", "Recover", "vol0")
        assert busy["error"] == "org.ublkd1.Error.Busy", busy
        guest.run("systemctl kill -s KILL ublkd@vol0")
        wait_in_guest(guest, "systemctl is-failed -q ublkd@vol0", 60)
        wait_in_guest(guest, "systemctl is-active -q ublkd-giveup@vol0", 60)
        kept = client(guest, "props", "vol0")
        assert (kept["State"], kept["BlockDevice"], kept["ServerPid"]) == ("QUIESCED", dev, 0)
        assert kept["UnitActiveState"] == "failed"

        busctl(guest, "Recover", "vol0")
        recovered = client(guest, "props", "vol0")
        assert recovered["State"] == "LIVE" and recovered["BlockDevice"] == dev
        assert recovered["Recoveries"] == kept["Recoveries"] + 1
        assert_properties_match_status(guest, "vol0", recovered)
        assert guest.run(f"timeout 60 dd if={dev} bs=4096 count=1 iflag=direct status=none | "
                         f"head -c 4").stdout == "kept"
    finally:
        guest.run("rm -rf /run/systemd/system/ublkd@vol0.service.d && systemctl daemon-reload")


def test_the_service_killed_leaves_devices_alone_and_comes_back(dbus_guest):
    guest = dbus_guest
    start(guest, "vol0", CONFIG)
    before = client(guest, "props", "vol0")
    service = show(guest, "ublkd-dbus", "MainPID")["MainPID"]
    assert service != "0"
    # Idle, it sleeps: its CPU time over 5 s (with a device whose watchdog
    # pings make systemd send signals) stays far below the 5 s a busy loop
    # would use (one did: an idle callback that never returned False).
    cpu = guest.run(f"t0=$(awk '{{print $14+$15}}' /proc/{service}/stat); sleep 5; "
                    f"t1=$(awk '{{print $14+$15}}' /proc/{service}/stat); "
                    f"echo $(( t1 - t0 ))").stdout
    assert int(cpu) < 100, f"{cpu} ticks (1/100 s) of CPU in 5 s idle"
    guest.run("systemctl kill -s KILL ublkd-dbus.service")
    wait_in_guest(guest, "! systemctl is-active -q ublkd-dbus.service", 30)
    assert device_status(guest, "vol0")["pid"] == before["ServerPid"]
    assert show(guest, "ublkd@vol0", "ActiveState")["ActiveState"] == "active"
    again = client(guest, "props", "vol0")  # activates the service again
    assert again == before
    assert show(guest, "ublkd-dbus", "MainPID")["MainPID"] not in ("0", service)
