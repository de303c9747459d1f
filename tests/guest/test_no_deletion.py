"""Ordinary events never delete a device that has users (issue 15).

Each test runs an application on the device (ext4 mounted, fio writing and
verifying through it) while the event happens, and checks what a user
would: fio's verify, the mount, the device's major:minor, e2fsck, and what
systemd shows.
"""

from __future__ import annotations

from tests.guest.serving import (FioThroughExt4, kill_and_wait_live, leftovers,
                                 run_in_background, show, start, wait_in_guest, write_config)

BACKING = "/var/tmp/vol0.img"
CONFIG = f'backend = "file"\npath = "{BACKING}"\nsize = "512MiB"\n'


def test_restart_hands_the_device_over_instead_of_deleting_it(systemd_guest, journal):
    guest = systemd_guest
    dev = start(guest, "vol0", CONFIG)["device"]
    application = FioThroughExt4(guest, dev)
    for _ in range(2):
        guest.run("sleep 2")
        main = show(guest, "ublkd@vol0", "MainPID")["MainPID"]
        guest.run("systemctl restart ublkd@vol0", timeout=300)
        assert show(guest, "ublkd@vol0", "MainPID")["MainPID"] != main
    application.finish()
    log = journal.of("ublkd@vol0")
    assert log.count("the unit is restarting; handing") == 2, log
    assert log.count(f"vol0: recovered {dev}") == 2, log
    assert "stopping /dev/ublkb" not in log, log


def test_edited_config_does_not_stop_the_recovery_of_a_mounted_device(systemd_guest,
                                                                         journal):
    guest = systemd_guest
    dev = start(guest, "vol0", CONFIG)["device"]
    application = FioThroughExt4(guest, dev)
    # An admin changes the size (applies at the next create), then a typo
    # makes the file unreadable; the daemon is killed before either is fixed.
    write_config(guest, "vol0", CONFIG.replace("512MiB", "1GiB"))
    guest.run("sleep 2")
    kill_and_wait_live(guest, "vol0")
    write_config(guest, "vol0", CONFIG + "recovery = reissue\n")  # unquoted: not TOML
    guest.run("sleep 2")
    kill_and_wait_live(guest, "vol0")
    application.finish()
    assert show(guest, "ublkd@vol0", "NRestarts")["NRestarts"] == "2"
    assert guest.run(f"blockdev --getsize64 {dev}").stdout.strip() == str(512 << 20)
    log = journal.of("ublkd@vol0")
    assert "size changed in /etc/ublkd/vol0.toml since" in log, log
    assert "recovering /dev/ublkb" in log and "with the configuration it was created" in log
    assert "ublkd-giveup" not in log


def test_plain_stop_still_deletes_the_device(systemd_guest, journal):
    guest = systemd_guest
    dev = start(guest, "vol0", CONFIG)["device"]
    guest.run("systemctl stop ublkd@vol0", timeout=300)
    wait_in_guest(guest, f"! test -e {dev}", 30)
    assert f"stopping {dev}" in journal.of("ublkd@vol0")


def test_stop_of_a_mounted_device_deletes_it_at_once_and_cleanly(systemd_guest, journal):
    """`systemctl stop` with a file system still mounted on the device (the
    admin forgot to unmount) deletes the device, as a stop does, and ends
    there: no wait until systemd's stop timeout (90 s) kills the daemon and
    marks the unit failed with its state file left behind.  The mount gets
    EIO; once unmounted, the device's number is free for a new start."""
    guest = systemd_guest
    dev = start(guest, "vol0", CONFIG)["device"]
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p /mnt/vol0 && mount {dev} /mnt/vol0 && "
              f"head -c 4M /dev/urandom > /mnt/vol0/data && sync")
    try:
        stopped = guest.run("timeout 60 systemctl stop ublkd@vol0", check=False, timeout=120)
        assert stopped.rc == 0, stopped.describe()
        unit = show(guest, "ublkd@vol0", "ActiveState", "Result")
        assert unit == {"ActiveState": "inactive", "Result": "success"}, unit
        assert leftovers(guest) == ""
        log = journal.of("ublkd@vol0")
        assert f"stopping {dev}" in log and "something still holds it" in log, log
    finally:
        guest.run("umount /mnt/vol0", check=False, timeout=60)
    assert start(guest, "vol0", CONFIG)["device"] == dev
    guest.run("systemctl stop ublkd@vol0", timeout=120)


def test_stop_while_a_restarted_daemon_starts_leaves_no_device_waiting(systemd_guest,
                                                                       journal):
    """The whole unit is killed and systemd restarts it; the stop lands while
    the new daemon is still starting (Python's imports take seconds here),
    before it has handlers for SIGTERM.  The device must not stay behind
    with queued I/O and no daemon: a reader waiting on it gets an answer."""
    guest = systemd_guest
    dev = start(guest, "vol0", CONFIG)["device"]
    guest.run("systemctl kill -s KILL ublkd@vol0")
    reader, box = run_in_background(
        guest, f"timeout 240 dd if={dev} of=/dev/null bs=4k count=1 iflag=direct")
    wait_in_guest(guest, "[ $(systemctl show -p NRestarts --value ublkd@vol0) = 1 ]", 60)
    guest.run("systemctl stop ublkd@vol0", timeout=300)
    reader.join(300)
    assert box and box[0].rc != 124, box[0].describe() if box else "the reader hung"
    assert leftovers(guest) == ""
    log = journal.of("ublkd@vol0")
    assert "stopped before a daemon served" in log or f"stopping {dev}" in log, log
