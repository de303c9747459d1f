"""The serving paths the performance work added, against the real driver.

The C queue loop serves file I/O through io_uring (the other guest tests),
with pread/pwrite in the queue thread for files on tmpfs, and lends
buffers per request when the device has NEED_GET_DATA.  What a user can
check: fio's verify is clean on each path, and the daemon's memory does
not grow with the queue depth.  No timings here: benchmarks/bench.py
measures speed.
"""

from __future__ import annotations

import json

from tests.guest.serving import STATE_DIR, ServedDevice, fio_jobs, write_config

UBLK_F_NEED_GET_DATA = 1 << 2


def vm_rss_kib(guest, pid: int) -> int:
    status = guest.read_file(f"/proc/{pid}/status")
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_fio_verify_on_a_tmpfs_backing_file_served_in_the_queue_thread(clean_guest):
    guest = clean_guest
    path = "/dev/shm/vol0.img"
    write_config(guest, "vol0", f'backend = "file"\npath = "{path}"\nsize = "128MiB"\n'
                                f'queues = 2\n')
    device = ServedDevice(guest, "vol0").start()
    try:
        fio = guest.run(
            f"fio --name=verify --filename={device.path} --rw=randrw --bs=4k,64k "
            f"--iodepth=32 --numjobs=2 --offset_increment=64M --size=16M --direct=1 "
            f"--ioengine=io_uring --verify=crc32c --verify_fatal=1 --output-format=json",
            timeout=1200,
        )
        assert [job["error"] for job in fio_jobs(fio)] == [0, 0]
        # Bytes land in the file: what the device says is what the file has.
        guest.run(f"cmp -n 16777216 {device.path} {path}")
    finally:
        assert device.stop().rc == 0
        guest.run(f"rm -f {path}")


def test_buffers_are_lent_per_request_so_memory_does_not_grow_with_depth(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", 'backend = "file"\npath = "/var/tmp/vol0.img"\n'
                                'size = "512MiB"\nqueues = 2\nqueue_depth = 128\n')
    device = ServedDevice(guest, "vol0").start()
    try:
        state = json.loads(guest.read_file(f"{STATE_DIR}/vol0.json"))
        assert state["flags"] & UBLK_F_NEED_GET_DATA, "the device was created without NEED_GET_DATA"
        before = vm_rss_kib(guest, device.pid)
        # 512 KiB requests one at a time: the kernel still cycles through all
        # 128 tags of a queue; one buffer per tag would make 64 MiB resident.
        guest.run(f"dd if=/dev/urandom of=/var/tmp/pattern bs=1M count=32 status=none && "
                  f"dd if=/var/tmp/pattern of={device.path} bs=512k oflag=direct status=none && "
                  f"for i in 1 2 3 4 5 6 7; do dd if=/var/tmp/pattern of={device.path} bs=512k "
                  f"seek=$((64 * i)) oflag=direct status=none; done")
        guest.run(f"dd if={device.path} of=/dev/null bs=512k count=512 iflag=direct status=none")
        grown = vm_rss_kib(guest, device.pid) - before
        assert grown < 16 * 1024, f"daemon RSS grew by {grown} KiB"
        guest.run(f"cmp -n 33554432 {device.path} /var/tmp/pattern")
    finally:
        assert device.stop().rc == 0
        guest.run("rm -f /var/tmp/pattern")
