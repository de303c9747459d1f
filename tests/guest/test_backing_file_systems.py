"""The file backend on the file systems a backing file lives on in practice.

Issue 10: on tmpfs, and on an overlay whose upper layer is tmpfs (the test
bed's own root), fallocate has no ZERO_RANGE; a device that advertised
write-zeroes failed every WRITE_ZEROES of mkfs and ext4lazyinit, and the
kernel logged each one.  Here every case zeroes, discards, makes and mounts
an ext4, and the kernel log must stay free of errors for the device.  Every
command that touches the device is bounded by `timeout`: a device whose
requests hang must fail the test, not stall the session.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest

from tests.guest.serving import ServedDevice, leftovers, show, write_config

MiB = 1024 * 1024
DISK = "/dev/disk/by-id/virtio-disk0"
MNT = "/mnt/vol0"


@dataclass(frozen=True)
class Backing:
    """Where the backing file lives: how to get it there and what the device should offer."""

    path: str
    setup: str = "true"
    teardown: str = "true"
    write_zeroes: bool = False
    discard: bool | str = True  # or a shell test deciding it in the guest


BACKINGS = {
    "tmpfs": Backing("/mnt/backing/zeroes.img",
                     "mkdir -p /mnt/backing && mount -t tmpfs -o size=400M tmpfs /mnt/backing",
                     "umount /mnt/backing"),
    "overlay-on-tmpfs": Backing("/var/tmp/zeroes.img"),  # the guest's root
    "ext4": Backing("/mnt/disk0/zeroes.img",
                    f"mkfs.ext4 -q -F {DISK} && mkdir -p /mnt/disk0 && mount {DISK} /mnt/disk0",
                    "umount /mnt/disk0", write_zeroes=True),
    # A block device zeroes any range; it punches holes (discard) only with
    # a write-zeroes command of its own, as the kernel's loop driver decides.
    "block-device": Backing(DISK, write_zeroes=True,
                            discard=f"[ $(cat /sys/block/$(basename $(readlink -f {DISK}))"
                                    f"/queue/write_zeroes_max_bytes) -gt 0 ]"),
}


def kernel_log_lines(guest) -> int:
    return int(guest.run("dmesg | wc -l").stdout)


def kernel_errors_since(guest, lines: int, device: str) -> str:
    """Kernel log lines since `lines` that report a failed request of `device`."""
    name = device.removeprefix("/dev/")
    return guest.run(f"dmesg | tail -n +{lines + 1} | grep -w {name} "
                     f"| grep -iE 'error|not supported|fail' ; true").stdout.strip()


def queue_limit(guest, device: str, limit: str) -> int:
    name = device.removeprefix("/dev/")
    return int(guest.read_file(f"/sys/block/{name}/queue/{limit}").strip())


@contextlib.contextmanager
def backing_in_place(guest, backing: Backing):
    guest.run(backing.setup, timeout=300)
    try:
        yield
    finally:
        guest.run(backing.teardown, check=False)


def expected_discard(guest, backing: Backing) -> bool:
    if isinstance(backing.discard, bool):
        return backing.discard
    return guest.run(backing.discard, check=False).rc == 0


@pytest.mark.parametrize("where", BACKINGS)
def test_zeroing_and_discard_work_with_no_kernel_error(clean_guest, where):
    guest = clean_guest
    backing = BACKINGS[where]
    with backing_in_place(guest, backing):
        write_config(guest, "zeroes", f'backend = "file"\npath = "{backing.path}"\n'
                                      f'size = "256MiB"\n')
        served = ServedDevice(guest, "zeroes").start()
        try:
            dev = served.path
            assert (queue_limit(guest, dev, "discard_max_bytes") > 0,
                    queue_limit(guest, dev, "write_zeroes_max_bytes") > 0) == \
                (expected_discard(guest, backing), backing.write_zeroes)
            log_mark = kernel_log_lines(guest)
            zeroes_read_back(guest, dev)
            discard_is_accepted(guest, dev)
            ext4_is_made_and_lazily_initialised(guest, dev)
            assert kernel_errors_since(guest, log_mark, dev) == ""
        finally:
            guest.run(f"timeout 60 umount -q {MNT}", check=False)
            result = served.stop()
        assert result.rc == 0, result.describe()
        assert f"backing file {backing.path}: fallocate PUNCH_HOLE" in result.stderr, \
            result.describe()


def zeroes_read_back(guest, dev: str) -> None:
    """Random data over 8 MiB, then zeroes over 1..5 MiB: two ways, both through
    blkdev_issue_zeroout (write-zeroes requests, or zero pages when the device
    has none)."""
    guest.run(f"head -c {8 * MiB} /dev/urandom > /tmp/pattern && "
              f"timeout 120 dd if=/tmp/pattern of={dev} bs=1M oflag=direct status=none")
    guest.run(f"timeout 120 blkdiscard -z -o {MiB} -l {2 * MiB} {dev}")
    guest.run(f"timeout 120 fallocate -z -o {3 * MiB} -l {2 * MiB} {dev}")
    guest.run(f"timeout 120 cmp -n {4 * MiB} -i {MiB}:0 {dev} /dev/zero")
    guest.run(f"timeout 120 cmp -n {MiB} /tmp/pattern {dev}")
    guest.run(f"timeout 120 cmp -n {3 * MiB} -i {5 * MiB} /tmp/pattern {dev}")


def discard_is_accepted(guest, dev: str) -> None:
    """BLKDISCARD fails with EOPNOTSUPP on a device without discard: skip it there."""
    if queue_limit(guest, dev, "discard_max_bytes"):
        guest.run(f"timeout 120 blkdiscard -o {6 * MiB} -l {MiB} {dev}")


def ext4_is_made_and_lazily_initialised(guest, dev: str) -> None:
    """mkfs zeroes the journal; ext4lazyinit (at full speed: init_itable=0) the
    inode tables, once mounted; both are write-zeroes where the device has it.

    A zeroed table is flagged ITABLE_ZEROED in its group descriptor, which
    reaches its place on the disk at a journal checkpoint: fsfreeze makes one.
    """
    guest.run(f"timeout 300 mkfs.ext4 -q -F {dev} && mkdir -p {MNT} && "
              f"timeout 60 mount -o init_itable=0 {dev} {MNT}", timeout=400)
    every_table_zeroed = (
        f"timeout 60 fsfreeze -f {MNT}; out=$(timeout 60 dumpe2fs {dev} 2>/dev/null); "
        f"timeout 60 fsfreeze -u {MNT}; "
        f"[ $(echo \"$out\" | grep -c ITABLE_ZEROED) -eq "
        f"$(echo \"$out\" | grep -c '^Group [0-9]*:') ]")
    wait = guest.run(f"for i in $(seq 60); do {every_table_zeroed} && exit 0; sleep 2; done; "
                     f"exit 1", check=False, timeout=1200)
    assert wait.rc == 0, "ext4lazyinit did not zero every inode table within 60 rounds"
    guest.run(f"timeout 60 umount {MNT} && timeout 120 e2fsck -fn {dev}", timeout=200)


def test_a_recovered_device_keeps_write_zeroes_where_the_file_system_lost_it(clean_guest):
    """Created on ext4 (write-zeroes advertised), recovered after the file moved
    to a tmpfs mounted at the same place: the device's parameters cannot
    change, so the new daemon writes the zeros itself."""
    guest = clean_guest
    ext4 = BACKINGS["ext4"]
    guest.run(ext4.setup, timeout=300)
    write_config(guest, "moved", f'backend = "file"\npath = "{ext4.path}"\nsize = "64MiB"\n')
    first = ServedDevice(guest, "moved").start()
    dev = first.path
    guest.run(f"head -c {8 * MiB} /dev/urandom > /tmp/pattern && "
              f"timeout 120 dd if=/tmp/pattern of={dev} bs=1M oflag=direct status=none")
    first.kill()
    guest.run(f"cp --sparse=always {ext4.path} /tmp/moved.img && umount /mnt/disk0 && "
              f"mount -t tmpfs -o size=200M tmpfs /mnt/disk0 && "
              f"cp --sparse=always /tmp/moved.img {ext4.path} && rm /tmp/moved.img")
    recovered = ServedDevice(guest, "moved").start()
    try:
        assert recovered.status["generation"] == first.status["generation"] + 1
        assert queue_limit(guest, dev, "write_zeroes_max_bytes") > 0
        log_mark = kernel_log_lines(guest)
        zeroes_read_back(guest, dev)
        discard_is_accepted(guest, dev)
        assert kernel_errors_since(guest, log_mark, dev) == ""
    finally:
        result = recovered.stop()
    assert result.rc == 0, result.describe()
    assert "ZERO_RANGE fails" in result.stderr, result.describe()


def test_a_directory_as_path_fails_the_unit_once_without_restarts(systemd_guest):
    guest = systemd_guest
    write_config(guest, "dir", 'backend = "file"\npath = "/var/tmp"\nsize = "64MiB"\n')
    started = guest.run("systemctl start ublkd@dir", check=False, timeout=180)
    assert started.rc != 0, started.describe()
    guest.run("sleep 3")  # RestartSec=0: a restart would have come by now
    unit = show(guest, "ublkd@dir", "NRestarts", "ActiveState", "Result", "ExecMainStatus")
    assert unit == {"NRestarts": "0", "ActiveState": "failed", "Result": "exit-code",
                    "ExecMainStatus": "2"}
    journal = guest.journal("-u", "ublkd@dir", "-n", "20")
    assert 'path = "/var/tmp" of device dir is a directory' in journal, journal
    assert leftovers(guest) == ""
