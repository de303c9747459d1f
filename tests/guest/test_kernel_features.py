"""What the ublk driver of a newer kernel adds, and what ublkd says on an
older one.  The module runs on both test bed kernels (6.12 and 6.18); a
test of a feature only 6.18 has runs there only (marked so), and skips,
naming the feature, where the kernel lacks it (UBLKD_TESTBED_KERNEL=6.12);
where ublkd must refuse a feature the kernel lacks, 6.12 tests the refusal.
Which kernel has what: docs/kernel-notes.md.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.guest.serving import (SLOW_IO_MS, describe_slow_ios, devnum, fio_jobs,
                                 hand_over_pause, kill_and_wait_live, show, start, ublkd,
                                 upgrade_under_fio, wait_in_guest, write_config)

pytestmark = pytest.mark.kernels("6.12", "6.18")

BACKING = "/var/tmp/vol0.img"
FILE_CONFIG = f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n'
NO_RESTART = "/run/systemd/system/ublkd@vol0.service.d/no-restart.conf"


def kernel_features(guest) -> set[str]:
    return set(json.loads(ublkd(guest, "features", "--json").stdout)["features"])


def needs(guest, feature: str) -> None:
    """Skip on a kernel whose ublk driver lacks `feature`, saying so."""
    if feature not in kernel_features(guest):
        release = guest.run("uname -r").stdout.strip()
        pytest.skip(f"the ublk driver of {release} has no UBLK_F_{feature}")


def read_block(guest, dev: str, timeout: int = 30):
    """One direct 4 KiB read of `dev`, bounded: a held request would hang.
    Its rc is dd's (124: timed out); stdout the block's first 8 bytes."""
    return guest.run(f"timeout {timeout} dd if={dev} of=/tmp/block bs=4096 count=1 "
                     f"iflag=direct status=none; rc=$?; head -c 8 /tmp/block; exit $rc",
                     check=False)


def test_features_explains_each_flag_the_kernel_has(clean_guest):
    guest = clean_guest
    out = ublkd(guest, "features").stdout
    for name in kernel_features(guest):
        line = next((line for line in out.splitlines() if line.split()[:1] == [name]), "")
        assert len(line.split()) > 2, f"{name} has no meaning in:\n{out}"
    assert "USER_RECOVERY_REISSUE" in out


@pytest.mark.kernels("6.18")
def test_fail_io_fails_io_at_once_while_no_daemon_and_recovers(systemd_guest, journal):
    """recovery = "fail_io": with the daemon gone (systemd told not to restart
    it) a read fails with EIO at once instead of waiting; a new daemon
    recovers the same device, and the data written before reads back."""
    guest = systemd_guest
    needs(guest, "USER_RECOVERY_FAIL_IO")
    guest.run(f"mkdir -p {NO_RESTART.rsplit('/', 1)[0]} && printf '[Service]\\nRestart=no\\n' "
              f"> {NO_RESTART} && systemctl daemon-reload")
    try:
        dev = start(guest, "vol0", FILE_CONFIG + 'recovery = "fail_io"\n'
                                                 'on_give_up = "keep"\n')["device"]
        before = devnum(guest, dev)
        guest.run(f"echo kept | dd of={dev} bs=4096 conv=sync oflag=direct status=none")
        guest.run("systemctl kill -s KILL ublkd@vol0")
        wait_in_guest(guest, "systemctl is-failed -q ublkd@vol0", 60)
        status = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
        assert status["state"] == "FAIL_IO", status

        # At once: the kernel fails new I/O with BLK_STS_TARGET (EREMOTEIO),
        # where reissue or abort would hold it until the timeout (rc 124).
        failed = read_block(guest, dev)
        assert failed.rc not in (0, 124), failed.describe()
        assert re.search("Remote I/O error|Input/output error", failed.stderr), failed.stderr

        guest.run("systemctl start ublkd@vol0", timeout=120)
        assert devnum(guest, dev) == before
        assert read_block(guest, dev).stdout.startswith("kept")
        assert json.loads(ublkd(guest, "status", "vol0", "--json").stdout)["state"] == "LIVE"
        assert "recovered /dev/ublkb" in journal.of("ublkd@vol0")
    finally:
        guest.run(f"rm -f {NO_RESTART} && systemctl daemon-reload")


@pytest.mark.kernels("6.18")
def test_fail_io_device_recovers_after_kill_9_under_systemd(systemd_guest):
    guest = systemd_guest
    needs(guest, "USER_RECOVERY_FAIL_IO")
    dev = start(guest, "vol0", FILE_CONFIG + 'recovery = "fail_io"\n')["device"]
    before = devnum(guest, dev)
    guest.run(f"echo again | dd of={dev} bs=4096 conv=sync oflag=direct status=none")
    kill_and_wait_live(guest, "vol0")
    assert devnum(guest, dev) == before
    assert read_block(guest, dev).stdout.startswith("again")
    assert show(guest, "ublkd@vol0", "NRestarts")["NRestarts"] == "1"


@pytest.mark.kernels("6.12")
def test_fail_io_on_a_kernel_without_it_is_a_configuration_error(systemd_guest):
    """Not a silent fallback to another mode: the unit fails once with the
    configuration error (exit 2, no restart loop) and no device is left."""
    guest = systemd_guest
    if "USER_RECOVERY_FAIL_IO" in kernel_features(guest):
        pytest.skip("this kernel has UBLK_F_USER_RECOVERY_FAIL_IO")
    write_config(guest, "vol0", FILE_CONFIG + 'recovery = "fail_io"\n')
    result = guest.run("systemctl start ublkd@vol0", check=False, timeout=120)
    assert result.rc != 0
    wait_in_guest(guest, "systemctl is-failed -q ublkd@vol0", 60)
    unit = show(guest, "ublkd@vol0", "ExecMainStatus", "NRestarts")
    assert unit == {"ExecMainStatus": "2", "NRestarts": "0"}, unit
    log = guest.run("journalctl -b -u ublkd@vol0 -o cat").stdout
    assert 'recovery = "fail_io" needs UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13)' in log, log
    assert guest.run("ls /sys/class/ublk-char/").stdout.strip() == ""


@pytest.mark.parametrize("mode", ["reissue", "abort"])
def test_upgrade_under_fio_quiesces_first_where_the_kernel_can(systemd_guest, journal, report,
                                                               mode):
    """`ublkd upgrade` under fio's verified writes on the raw device: on a
    kernel with UBLK_F_QUIESCE the old daemon quiesces the device (no request
    is left for the successor to re-issue), which also makes an "abort"
    device safe to hand over; without it only "reissue" is handed over.  No
    write fails, the same /dev/ublkbN serves on.  Reported: the hand-over's
    I/O pause (what the I/Os completing as the successor began to serve
    had waited), and apart from it fio's longest I/O and when each slow
    one completed, so that a stall elsewhere shows as such."""
    guest = systemd_guest
    quiesce = "QUIESCE" in kernel_features(guest)
    if mode == "abort" and not quiesce:
        pytest.skip("without UBLK_F_QUIESCE an \"abort\" device is not handed over "
                    "(test_upgrade_policy.py tests the refusal)")
    status = start(guest, "vol0", FILE_CONFIG + f'recovery = "{mode}"\n')
    job = upgrade_under_fio(guest, "vol0", status)
    log = journal.of("ublkd@vol0")
    assert ("quiesced in" in log) == quiesce, log
    assert show(guest, "ublkd@vol0", "ActiveState")["ActiveState"] == "active"
    release = guest.run("uname -r").stdout.strip()
    quiesced = re.search(r"quiesced in (\d+) ms", log)
    let_go = re.search(r"queues let go in \d+ ms", log)
    served = re.search(r"served again (.*) after the old server", log)
    report(f"upgrade under fio ({release}, recovery = {mode}, "
           f"{f'QUIESCE_DEV took {quiesced.group(1)} ms' if quiesced else 'no quiesce'}): "
           f"hand-over pause {hand_over_pause(job)}, longest I/O "
           f"{max(job[op]['clat_ns']['max'] for op in ('read', 'write')) / 1e6:.0f} ms; I/Os "
           f"over {SLOW_IO_MS} ms by completion time from the hand-over: "
           f"{describe_slow_ios(job)}; old worker: "
           f"{let_go.group(0) if let_go else '?'}; successor: served again "
           f"{served.group(1) if served else '?'}")


@pytest.mark.kernels("6.18")
@pytest.mark.parametrize("queues", [1, 2])
def test_zero_copy_file_device_verifies_and_recovers(systemd_guest, queues):
    """Where the kernel has UBLK_F_AUTO_BUF_REG a file device is made with it
    (zero copy: the backing file is read into and written from the request's
    own pages); elsewhere with today's buffers.  Either way fio's verify of
    4k and 128k random I/O is clean, before and after a kill -9 of the
    daemon (the recovered daemon serves the same way)."""
    guest = systemd_guest
    zero_copy = "AUTO_BUF_REG" in kernel_features(guest)
    start(guest, "vol0", FILE_CONFIG + f"queues = {queues}\n")
    status = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert ("AUTO_BUF_REG" in status["flags"]) == zero_copy, status
    dev = status["device"]
    for round_ in ("before", "after"):
        for block_size in ("4k", "128k"):
            result = guest.run(
                f"fio --name=zc --filename={dev} --rw=randrw --bs={block_size} --size=32M "
                f"--numjobs=2 --offset_increment=32M --ioengine=io_uring --iodepth=16 "
                f"--direct=1 --verify=crc32c --verify_fatal=1 --output-format=json",
                timeout=600)
            assert all(job["error"] == 0 for job in fio_jobs(result)), (round_, block_size)
        if round_ == "before":
            kill_and_wait_live(guest, "vol0")
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert after["flags"] == status["flags"] and after["generation"] == 2


def test_a_tmpfs_file_device_copies_once_through_the_mapped_file(systemd_guest):
    """A backing file on tmpfs, which io_uring serves only through worker
    threads, gets UBLK_F_USER_COPY (6.5+, so both kernels): the queue
    copies between each request and the mapped file, once.  Bytes written
    to the device are the file's bytes, fio's verify of 4k and 128k random
    I/O is clean, and the recovered daemon serves the same way."""
    guest = systemd_guest
    backing = "/dev/shm/vol0.img"
    try:
        start(guest, "vol0", f'backend = "file"\npath = "{backing}"\nsize = "64MiB"\n')
        status = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
        assert "USER_COPY" in status["flags"], status
        assert not {"AUTO_BUF_REG", "NEED_GET_DATA"} & set(status["flags"]), status
        dev = status["device"]
        guest.run(f"head -c 1M /dev/urandom > /tmp/data && dd if=/tmp/data of={dev} bs=1M "
                  f"seek=3 oflag=direct status=none && cmp -n 1M -i 0:3M /tmp/data {backing}")
        for round_ in ("before", "after"):
            for block_size in ("4k", "128k"):
                result = guest.run(
                    f"fio --name=uc --filename={dev} --rw=randrw --bs={block_size} "
                    f"--offset=8M --size=24M --numjobs=2 --offset_increment=24M "
                    f"--ioengine=io_uring --iodepth=16 --direct=1 --verify=crc32c "
                    f"--verify_fatal=1 --output-format=json", timeout=600)
                assert all(job["error"] == 0 for job in fio_jobs(result)), (round_, block_size)
            if round_ == "before":
                kill_and_wait_live(guest, "vol0")
        guest.run(f"cmp -n 1M /tmp/data {dev} -i 0:3M")
        after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
        assert after["flags"] == status["flags"] and after["generation"] == 2
    finally:
        guest.run(f"systemctl stop ublkd@vol0; rm -f {backing}")


@pytest.mark.kernels("6.18")
def test_zero_copy_false_keeps_the_copying_path(systemd_guest):
    guest = systemd_guest
    needs(guest, "AUTO_BUF_REG")
    start(guest, "vol0", FILE_CONFIG + "zero_copy = false\n")
    status = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert "AUTO_BUF_REG" not in status["flags"]
    result = guest.run(f"fio --name=copy --filename={status['device']} --rw=randrw --bs=64k "
                       f"--size=16M --ioengine=io_uring --iodepth=8 --direct=1 "
                       f"--verify=crc32c --verify_fatal=1 --output-format=json", timeout=600)
    assert fio_jobs(result)[0]["error"] == 0
