"""`ublkd serve` against the real driver: data in, same data out."""

from __future__ import annotations

import json

import pytest

from tests.guest.serving import (STATE_DIR, ServedDevice, device_status, fio_jobs, ublkd,
                                 write_config)

BACKING = "/var/tmp/vol0.img"


def file_config(path: str = BACKING, extra: str = "") -> str:
    return f'backend = "file"\npath = "{path}"\nsize = "256MiB"\n{extra}'


@pytest.mark.kernels("6.12", "6.18")
def test_ext4_data_survives_remount_and_restart(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", file_config())
    device = ServedDevice(guest, "vol0").start()
    dev = device.path
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p /mnt/vol0 && mount {dev} /mnt/vol0")
    guest.run("for i in $(seq 16); do head -c 4M /dev/urandom > /mnt/vol0/f$i; done")
    sums = guest.run("cd /mnt/vol0 && sha256sum f*").stdout
    guest.run("umount /mnt/vol0")
    guest.run(f"mount {dev} /mnt/vol0")
    assert guest.run("cd /mnt/vol0 && sha256sum f*").stdout == sums
    guest.run("umount /mnt/vol0")

    # Raw bytes land in the backing file at the same offset.
    guest.run(f"head -c 1M /dev/urandom > /tmp/pattern && "
              f"dd if=/tmp/pattern of={dev} bs=1M seek=100 oflag=direct status=none")
    assert device.stop().rc == 0
    guest.run(f"cmp -n 1048576 /tmp/pattern {BACKING} -i 0:104857600")

    # A new daemon on the same backing file serves the same file system.
    device = ServedDevice(guest, "vol0").start()
    guest.run(f"mount {device.path} /mnt/vol0")
    assert guest.run("cd /mnt/vol0 && sha256sum f*").stdout == sums
    guest.run("umount /mnt/vol0")
    device.stop()


@pytest.mark.parametrize("block_size", ["4k", "64k"])
def test_fio_verify_is_clean_with_two_queues(clean_guest, block_size):
    guest = clean_guest
    write_config(guest, "vol0", file_config(extra="queues = 2\n"))
    device = ServedDevice(guest, "vol0").start()
    assert device_status(guest, "vol0")["queues"] == 2
    fio = guest.run(
        f"fio --name=verify --filename={device.path} --rw=randwrite --bs={block_size} "
        f"--iodepth=32 --numjobs=2 --offset_increment=128M --size=32M --direct=1 "
        f"--ioengine=io_uring --verify=crc32c --verify_fatal=1 --output-format=json",
        timeout=1200,
    )
    jobs = fio_jobs(fio)
    assert [job["error"] for job in jobs] == [0, 0]
    assert all(job["read"]["io_bytes"] == 32 << 20 for job in jobs)  # the verify pass
    assert device.stop().rc == 0


def test_discard_punches_holes_in_the_backing_file(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", file_config())
    device = ServedDevice(guest, "vol0").start()
    guest.run(f"dd if=/dev/urandom of={device.path} bs=1M count=64 oflag=direct status=none")
    before = int(guest.run(f"du -k {BACKING}").stdout.split()[0])
    assert before >= 64 * 1024
    assert guest.read_file(f"/sys/block/ublkb{device.dev_id}/queue/discard_max_bytes") != "0\n"
    guest.run(f"blkdiscard {device.path}")
    after = int(guest.run(f"du -k {BACKING}").stdout.split()[0])
    assert after < 1024, (before, after)
    assert guest.run(f"cmp -n 67108864 {device.path} /dev/zero", check=False).rc == 0
    device.stop()


def test_flush_reaches_the_backing_disk(clean_guest):
    """A FLUSH of the ublk device becomes fdatasync on the backing file,
    which makes ext4 flush the disk below it: count the disk's flushes."""
    guest = clean_guest
    guest.run("mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt/disk0 && "
              "mount -o commit=600 /dev/vda /mnt/disk0")
    write_config(guest, "vol0", file_config(path="/mnt/disk0/vol0.img"))
    device = ServedDevice(guest, "vol0").start()
    guest.run(f"dd if=/dev/urandom of={device.path} bs=1M count=8 oflag=direct status=none")
    guest.run("sync /mnt/disk0/vol0.img")

    def flushes() -> int:
        return int(guest.read_file("/sys/block/vda/stat").split()[15])

    start = flushes()
    guest.run(f"dd if=/dev/urandom of={device.path} bs=4k count=4 oflag=direct status=none")
    without_fsync = flushes()
    guest.run(f"dd if=/dev/urandom of={device.path} bs=4k count=4 oflag=direct conv=fsync "
              f"status=none")
    with_fsync = flushes()
    assert without_fsync - start <= 1
    assert with_fsync > without_fsync
    device.stop()
    guest.run("rm /mnt/disk0/vol0.img && umount /mnt/disk0")


def test_null_backend_reads_zeros_and_drops_writes(clean_guest):
    guest = clean_guest
    write_config(guest, "null0", 'backend = "null"\nsize = "1GiB"\n')
    device = ServedDevice(guest, "null0").start()
    assert guest.run(f"blockdev --getsize64 {device.path}").stdout.strip() == str(1 << 30)
    guest.run(f"dd if=/dev/urandom of={device.path} bs=1M count=16 oflag=direct status=none")
    guest.run(f"cmp -n 16777216 {device.path} /dev/zero")
    fio = guest.run(f"fio --name=rr --filename={device.path} --rw=randread --bs=4k "
                    f"--iodepth=16 --ioengine=io_uring --direct=1 --runtime=5 --time_based "
                    f"--output-format=json", timeout=600)
    job = fio_jobs(fio)[0]
    assert job["error"] == 0 and job["read"]["total_ios"] > 0
    device.stop()


def test_sigterm_removes_device_and_state(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", file_config())
    device = ServedDevice(guest, "vol0").start()
    assert guest.run(f"test -f {STATE_DIR}/vol0.json", check=False).rc == 0
    listed = json.loads(ublkd(guest, "list", "--json").stdout)
    assert [(d["name"], d["state"]) for d in listed] == [("vol0", "LIVE")]
    table = ublkd(guest, "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ID", "DEVICE", "STATE", "PID", "BACKEND", "SIZE"]
    assert table[1].split()[:4] == ["vol0", str(device.dev_id), device.path, "LIVE"]
    result = device.stop()
    assert result.rc == 0, result.describe()
    assert "stopping /dev/ublkb" in result.stderr
    assert json.loads(ublkd(guest, "list", "--json").stdout) == []
    assert ublkd(guest, "list").stdout.split() == ["NAME", "ID", "DEVICE", "STATE", "PID",
                                                   "BACKEND", "SIZE"]
    assert guest.run(f"test -e {device.path}", check=False).rc == 1
    assert guest.run(f"test -e {STATE_DIR}/vol0.json", check=False).rc == 1


def test_features_lists_recovery(clean_guest):
    out = ublkd(clean_guest, "features").stdout
    assert "USER_RECOVERY" in out and "USER_RECOVERY_REISSUE" in out


def test_delete_removes_an_orphaned_device_but_not_a_served_one(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", file_config())
    device = ServedDevice(guest, "vol0").start()
    refused = ublkd(guest, "delete", "vol0", check=False)
    assert refused.rc == 5 and "systemctl stop ublkd@vol0" in refused.stderr
    device.kill()
    listed = json.loads(ublkd(guest, "list", "--json").stdout)
    assert [(d["name"], d["state"]) for d in listed] == [("vol0", "QUIESCED")]
    ublkd(guest, "delete", "vol0")
    assert guest.run(f"test -e {device.path}", check=False).rc == 1
    assert guest.run(f"test -e {STATE_DIR}/vol0.json", check=False).rc == 1
