"""A corrupt, lost or stale state file never loses a device nor touches another one.

The kernel keeps a cookie of the device's name (ublkd/identity.py): with
the state file torn, a restarted daemon recovers the same device, and
`ublkd delete` / `ublkd give-up` still find it, so its queued I/O never
waits with no daemon.  Every read the tests make on a device that may be
quiesced is bounded with `timeout`.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.serving import (STATE_DIR, UBLKD, ServedDevice, devnum, kill_and_wait_live,
                                 leftovers, run_in_background, start, ublkd,
                                 wait_in_guest, write_config)

BACKING = "/var/tmp/vol0.img"
MNT = "/mnt/vol0"
TORN = '{\\n  "config": {\\n    "backend": "fi'  # a write cut off in the middle


def tear_state(guest, name: str) -> None:
    """Overwrite the state file with the first bytes of a JSON document."""
    guest.run(f"printf '{TORN}' > {STATE_DIR}/{name}.json")


def test_torn_state_file_then_kill_recovers_the_mounted_device(systemd_guest, journal):
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "128MiB"\n')
    dev = status["device"]
    before = devnum(guest, dev)
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p {MNT} && mount {dev} {MNT} && "
              f"head -c 4M /dev/urandom > /tmp/payload && cp /tmp/payload {MNT}/payload && sync")
    tear_state(guest, "vol0")
    kill_and_wait_live(guest, "vol0", timeout=120)
    assert devnum(guest, dev) == before
    assert f"{dev} {MNT} ext4" in guest.read_file("/proc/mounts")
    guest.run(f"echo 3 > /proc/sys/vm/drop_caches; timeout 120 cmp /tmp/payload {MNT}/payload")
    guest.run(f"timeout 120 dd if=/dev/urandom of={MNT}/more bs=1M count=8 conv=fsync "
              f"status=none")
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert after["state"] == "LIVE" and after["id"] == status["id"]
    assert guest.read_file(f"{STATE_DIR}/vol0.json.corrupt") == TORN.replace("\\n", "\n")
    json.loads(guest.read_file(f"{STATE_DIR}/vol0.json"))  # a whole file again
    log = journal.of("ublkd@vol0")
    assert "vol0.json: it is not valid JSON" in log, log
    assert f"found {dev} by its cookie" in log and f"vol0: recovered {dev}" in log, log
    guest.run(f"umount {MNT} && e2fsck -fn {dev}")


@pytest.mark.parametrize("command", [["delete", "vol0"], ["give-up", "vol0"]])
def test_corrupt_state_file_does_not_keep_a_dead_device(clean_guest, command):
    guest = clean_guest
    write_config(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n')
    device = ServedDevice(guest, "vol0").start()
    tear_state(guest, "vol0")
    device.kill()
    wait_in_guest(guest, f"{UBLKD} list | grep -q QUIESCED", 60)
    # A reader waits on the quiesced device; deleting it must fail that read.
    reader, box = run_in_background(
        guest, f"timeout 120 dd if={device.path} of=/dev/null bs=4k count=1 iflag=direct")
    result = ublkd(guest, *command, timeout=120)
    reader.join(180)
    assert box and box[0].rc not in (0, 124), box[0].describe() if box else "reader hung"
    assert "deleted" in result.stdout + result.stderr, result.describe()
    assert "not valid JSON" in result.stderr, result.describe()
    assert leftovers(guest) == ""


def test_stale_state_file_naming_another_device_leaves_it_alone(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", 'backend = "null"\nsize = "64MiB"\n')
    write_config(guest, "vol1", 'backend = "file"\npath = "/var/tmp/vol1.img"\n'
                                'size = "32MiB"\n')
    vol0 = ServedDevice(guest, "vol0").start()
    vol1 = ServedDevice(guest, "vol1").start()
    guest.run(f"head -c 4M /dev/urandom > /tmp/vol1-data && "
              f"dd if=/tmp/vol1-data of={vol1.path} bs=1M oflag=direct status=none")
    state = json.loads(guest.read_file(f"{STATE_DIR}/vol0.json"))
    assert vol0.stop().rc == 0
    # What an unclean shutdown can leave: vol0's old state naming the id
    # that vol1 has now.
    guest.write_file(f"{STATE_DIR}/vol0.json", json.dumps({**state, "dev_id": vol1.dev_id}))
    result = ublkd(guest, "delete", "vol0")
    assert "already gone" in result.stdout, result.describe()
    assert "is another device now" in result.stderr, result.describe()
    assert json.loads(ublkd(guest, "status", "vol1", "--json").stdout)["state"] == "LIVE"
    guest.run(f"timeout 60 cmp -n 4194304 /tmp/vol1-data {vol1.path}")
    assert vol1.stop().rc == 0
    assert leftovers(guest) == ""


def test_unit_with_torn_state_and_no_device_starts_anew_without_creating_the_file(
        systemd_guest, journal):
    guest = systemd_guest
    write_config(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n')
    guest.run(f"mkdir -p -m 700 {STATE_DIR}")
    tear_state(guest, "vol0")
    try:
        result = guest.run("systemctl start ublkd@vol0", check=False, timeout=180)
        # The torn file says the device held data: its missing backing file
        # is not created empty (exit 6, and systemd tries again: the file
        # system may not be mounted yet), and the file is kept for the admin.
        assert result.rc != 0
        wait_in_guest(guest, f"{journal.command('ublkd@vol0')} | grep -q status=6/", 60)
        log = journal.of("ublkd@vol0")
        assert "status=6/NOTCONFIGURED" in log and "no device of its in the kernel" in log, log
        assert guest.run(f"test -e {BACKING}", check=False).rc == 1
        assert guest.run(f"test -e {STATE_DIR}/vol0.json.corrupt", check=False).rc == 0
    finally:
        guest.run("systemctl stop ublkd@vol0; systemctl reset-failed 'ublkd*'; "
                  f"rm -f {STATE_DIR}/vol0.json.corrupt")
