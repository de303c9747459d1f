"""ublkd@NAME under systemd: the device survives its daemon.

Every test here uses the installed units (make install-units) with systemd
as PID 1 and the real ublk driver, and checks what a user would: the same
/dev/ublkbN (major:minor), the mount still there, fio's verify, e2fsck,
`systemctl show` states, the journal.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from tests.guest.serving import (CHECKOUT, STATE_DIR, FioThroughExt4, ServedDevice,
                                 device_status, devnum, fio_jobs, kill_and_wait_live,
                                 kill_worker_and_time_first_read, run_in_background, show, start,
                                 ublkd, wait_in_guest, write_config)

BACKING = "/var/tmp/vol0.img"
MNT = "/mnt/vol0"
WATCHDOG_DROP_IN = "/run/systemd/system/ublkd@vol0.service.d/watchdog.conf"


@contextlib.contextmanager
def watchdog_seconds(guest, seconds: int):
    """ublkd@vol0 with WatchdogSec=`seconds` (a drop-in) instead of the unit's 20 s:
    tests that outwait the watchdog wait less; the daemon derives its
    limits from WATCHDOG_USEC, whatever it is."""
    guest.run(f"mkdir -p {WATCHDOG_DROP_IN.rsplit('/', 1)[0]} && printf "
              f"'[Service]\\nWatchdogSec={seconds}s\\n' > {WATCHDOG_DROP_IN} && "
              f"systemctl daemon-reload")
    try:
        yield
    finally:
        guest.run(f"rm -f {WATCHDOG_DROP_IN}; systemctl daemon-reload")


def test_units_verify_clean(units_installed):
    # The man pages come with the package; the checkout's units are verified
    # without them.
    guest = units_installed
    result = guest.run("systemd-analyze verify --man=no ublkd@vol0.service "
                       "ublkd-giveup@vol0.service "
                       "ublkd-recover@vol0.service ublkd-dbus.service 2>&1", check=False)
    assert result.rc == 0 and result.stdout.strip() == "", result.describe()


def test_reissue_survives_five_kills_under_fio_through_ext4(systemd_guest, journal, report):
    times = survives_kills_under_fio_through_ext4(systemd_guest, journal, kills=5, who="main")
    report(f"reissue, ext4 + fio: kill -9 to LIVE again (guest s): "
           f"{', '.join(f'{t:.2f}' for t in times)}")


def test_reissue_survives_whole_unit_kills_under_fio_through_ext4(systemd_guest, journal,
                                                                   report):
    """`systemctl kill -s KILL`: the main process and the worker die at once, as
    when the OOM killer takes the unit's cgroup; systemd restarts the unit."""
    times = survives_kills_under_fio_through_ext4(systemd_guest, journal, kills=3, who="unit")
    report(f"reissue, ext4 + fio: systemctl kill -s KILL of the unit to LIVE again (guest s): "
           f"{', '.join(f'{t:.2f}' for t in times)}")


def survives_kills_under_fio_through_ext4(guest, journal, kills: int, who: str) -> list[float]:
    """Kill ublkd@vol0 (kill_and_wait_live's `who`) `kills` times while fio
    writes and verifies through a mounted ext4; nothing may notice. Returns
    the guest seconds from each kill to the unit being LIVE again."""
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "512MiB"\n')
    dev = status["device"]
    application = FioThroughExt4(guest, dev, MNT)
    times = []
    for _ in range(kills):
        guest.run("sleep 1")  # fio at work again, its requests in flight
        times.append(kill_and_wait_live(guest, "vol0", who=who))
    assert show(guest, "ublkd@vol0", "NRestarts")["NRestarts"] == str(kills)
    log = journal.of("ublkd@vol0")
    assert len(re.findall(rf"vol0: recovered {dev}", log)) == kills, log
    application.finish()
    return times


@pytest.mark.parametrize("signal", ["SEGV", "ABRT"])
def test_crashed_worker_is_replaced_in_place_on_the_same_device(systemd_guest, journal, signal):
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n'
                                  f'recovery = "abort"\n')
    dev = status["device"]
    main = show(guest, "ublkd@vol0", "MainPID")["MainPID"]
    guest.run(f"head -c 1M /dev/urandom > /tmp/p && dd if=/tmp/p of={dev} bs=1M "
              f"oflag=direct status=none")
    before = devnum(guest, dev)
    kill_worker_and_time_first_read(guest, "vol0", dev, signal)
    assert devnum(guest, dev) == before
    guest.run(f"cmp -n 1048576 /tmp/p {dev}")
    unit = show(guest, "ublkd@vol0", "NRestarts", "ActiveState", "MainPID")
    assert unit == {"NRestarts": "0", "ActiveState": "active", "MainPID": main}
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert after["pid"] != status["pid"] and after["generation"] == status["generation"] + 1
    assert f"killed by SIG{signal}; a new worker recovers" in journal.of("ublkd@vol0")


def test_killed_worker_is_replaced_in_place_under_fio(systemd_guest, journal, report):
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "256MiB"\n')
    dev = status["device"]
    main = show(guest, "ublkd@vol0", "MainPID")["MainPID"]
    before = devnum(guest, dev)
    fio, box = run_in_background(
        guest, f"fio --name=worker --filename={dev} --rw=randwrite --bs=4k --size=32M "
               f"--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 "
               f"--output-format=json")
    gaps = []
    for _ in range(3):
        guest.run("sleep 2")
        gaps.append(kill_worker_and_time_first_read(guest, "vol0", dev))
    fio.join(1800)
    assert box[0].rc == 0, box[0].describe()
    assert fio_jobs(box[0])[0]["error"] == 0
    assert devnum(guest, dev) == before
    unit = show(guest, "ublkd@vol0", "NRestarts", "ActiveState", "MainPID")
    assert unit == {"NRestarts": "0", "ActiveState": "active", "MainPID": main}
    journal = journal.of("ublkd@vol0")
    assert len(re.findall(r"killed by SIGKILL; a new worker recovers", journal)) == 3, journal
    assert len(re.findall(rf"vol0: recovered {dev}", journal)) == 3, journal
    report(f"worker kill -9 under fio, to the first read served again (guest s): "
           f"{', '.join(f'{t:.2f}' for t in gaps)}")


def test_a_failed_queue_ends_the_worker_like_a_crash_under_fio_through_ext4(systemd_guest,
                                                                           journal):
    """A queue whose ring call fails (io_uring_enter returning EBUSY, as under
    memory pressure; injected into the serving worker with strace) must not
    make the daemon delete the device under its file system: the worker ends
    as a crash would and the main process forks one that recovers it."""
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "512MiB"\n')
    dev = status["device"]
    main = show(guest, "ublkd@vol0", "MainPID")["MainPID"]
    application = FioThroughExt4(guest, dev, MNT)
    guest.run("sleep 2")
    # Every thread's next io_uring_enter fails; strace ends with the worker.
    strace = guest.run(f"timeout 120 strace -f -qq -o /dev/null -e trace=io_uring_enter "
                       f"-e inject=io_uring_enter:error=EBUSY:when=1 -p {status['pid']}",
                       check=False, timeout=180)
    wait_in_guest(guest, f"{journal.command('ublkd@vol0')} | grep -q 'vol0: recovered {dev}'",
                  timeout=120, explain=lambda: f"strace: {strace.describe()}\n"
                                               f"journal:\n{journal.of('ublkd@vol0')}")
    application.finish()
    unit = show(guest, "ublkd@vol0", "NRestarts", "ActiveState", "MainPID")
    assert unit == {"NRestarts": "0", "ActiveState": "active", "MainPID": main}
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert after["pid"] != status["pid"] and after["generation"] == status["generation"] + 1
    log = journal.of("ublkd@vol0")
    assert re.search(r"vol0: queue \d stopped serving: .*Device or resource busy", log), log
    assert "ending this worker so that a new one recovers" in log, log
    assert "killed by SIGKILL; a new worker recovers" in log, log
    assert "stopping" not in log and "deleted" not in log, log


def test_stopped_daemon_is_killed_by_the_watchdog_and_recovers(systemd_guest, journal):
    guest = systemd_guest
    with watchdog_seconds(guest, 8):
        status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n')
        dev = status["device"]
        seconds = kill_and_wait_live(guest, "vol0", "STOP", timeout=180, who="worker")
        assert seconds >= 6  # WatchdogSec=8s: it was the watchdog, not a crash
        assert "Watchdog timeout" in journal.of("ublkd@vol0")
        guest.run(f"dd if=/dev/urandom of={dev} bs=4k count=16 oflag=direct status=none")


def test_status_line_and_journal_name_the_device(systemd_guest, journal):
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n')
    dev = status["device"]
    assert show(guest, "ublkd@vol0", "StatusText")["StatusText"] == \
        f"{dev} LIVE, file backend, recovered 0 times"
    kill_and_wait_live(guest, "vol0")
    assert show(guest, "ublkd@vol0", "StatusText")["StatusText"] == \
        f"{dev} LIVE, file backend, recovered 1 time"
    text = guest.run("systemctl status ublkd@vol0 --no-pager", check=False).stdout
    assert f"Status: \"{dev} LIVE, file backend, recovered 1 time\"" in text
    journal = journal.of("ublkd@vol0")
    assert f"vol0: created {dev}" in journal
    assert "Main process exited, code=killed, status=9/KILL" in journal
    assert f"vol0: recovered {dev}" in journal


def test_crash_between_start_and_end_of_recovery_still_recovers(systemd_guest):
    """`ublkd recover` sends START_USER_RECOVERY and exits: exactly what a
    daemon killed after START and before END leaves behind."""
    guest = systemd_guest
    write_config(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n')
    device = ServedDevice(guest, "vol0").start()
    guest.run(f"head -c 1M /dev/urandom > /tmp/p && dd if=/tmp/p of={device.path} bs=1M "
              f"oflag=direct status=none")
    device.kill()
    ublkd(guest, "recover", "vol0", timeout=120)
    again = ServedDevice(guest, "vol0").start()
    assert again.dev_id == device.dev_id
    guest.run(f"cmp -n 1048576 /tmp/p {again.path}")
    assert again.stop().rc == 0


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_crash_loop_past_the_start_limit_applies_on_give_up(systemd_guest, journal, policy):
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n'
                                  f'on_give_up = "{policy}"\n')
    dev = status["device"]
    # The backing file disappears: every restart fails until systemd gives up.
    guest.run(f"mv {BACKING} {BACKING}.away")
    guest.run("systemctl kill -s KILL ublkd@vol0")
    wait_in_guest(guest, "systemctl is-failed -q ublkd@vol0", 120)
    wait_in_guest(guest, "systemctl is-active -q ublkd-giveup@vol0", 60)
    assert int(show(guest, "ublkd@vol0", "NRestarts")["NRestarts"]) >= 5
    giveup_log = journal.of("ublkd-giveup@vol0")
    if policy == "delete":
        assert "deleted" in giveup_log
        assert guest.run(f"test -e {dev}", check=False).rc == 1
        assert guest.run(f"test -e {STATE_DIR}/vol0.json", check=False).rc == 1
        return
    assert "is kept" in giveup_log
    assert guest.run(f"test -b {dev}", check=False).rc == 0
    guest.run(f"mv {BACKING}.away {BACKING}")
    guest.run("systemctl start ublkd-recover@vol0", timeout=120)
    wait_in_guest(guest, "systemctl is-active -q ublkd@vol0", 60)
    assert ublkd(guest, "status", "vol0", "--json").stdout.count('"LIVE"') == 1


def test_stop_removes_device_and_state_and_start_works_again(systemd_guest):
    guest = systemd_guest
    config = f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n'
    dev = start(guest, "vol0", config)["device"]
    guest.run("systemctl stop ublkd@vol0")
    assert guest.run(f"test -e {dev}", check=False).rc == 1
    assert guest.run(f"test -e {STATE_DIR}/vol0.json", check=False).rc == 1
    assert show(guest, "ublkd@vol0", "ActiveState", "Result") == \
        {"ActiveState": "inactive", "Result": "success"}
    start(guest, "vol0", config)
    assert device_status(guest, "vol0")["state"] == "LIVE"


def test_reboot_unmounts_first_and_leaves_no_debris(systemd_guest):
    """The state directory lives on the persistent disk; after a reboot
    with a mounted file system on the device, the next start is clean.
    Also the test bed's own promise: a reboot is a new boot that keeps the
    disks and forgets the root's changes (its /etc, /root: a tmpfs)."""
    guest = systemd_guest
    guest.run("mkfs.ext4 -q -F /dev/vda && mkdir -p /var/lib/ublkd /srv/images && "
              "mount /dev/vda /srv/images && mkdir -p /srv/images/state && "
              "mount --bind /srv/images/state /var/lib/ublkd")
    config = 'backend = "file"\npath = "/srv/images/vol0.img"\nsize = "64MiB"\n'
    dev = start(guest, "vol0", config)["device"]
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p {MNT} && mount {dev} {MNT} && "
              f"echo hello > {MNT}/file && echo volatile > /root/marker")
    first_boot = guest.boot_id
    guest.reboot()
    assert guest.boot_id != first_boot
    assert guest.run("test -e /root/marker", check=False).rc == 1
    # systemd prints each unit it stops on the console (show_status).
    log = (guest.log_dir / f"console-boot{guest.boots - 1}.log").read_text(errors="replace")
    console = re.sub(r"\x1b\[[0-9;]*m", "", log)
    stopped = [console.index(line) for line in ("Unmounted mnt-vol0.mount",
                                                "Stopped ublkd@vol0.service",
                                                "Unmounted srv-images.mount")]
    assert stopped == sorted(stopped), console[-3000:]
    guest.run(f"make -s -C {CHECKOUT} install-units")
    guest.run("mkdir -p /srv/images /var/lib/ublkd && mount /dev/vda /srv/images && "
              "mount --bind /srv/images/state /var/lib/ublkd")
    assert guest.run("ls /var/lib/ublkd").stdout.strip() == ""
    dev = start(guest, "vol0", config)["device"]
    guest.run(f"mkdir -p {MNT} && mount {dev} {MNT}")
    assert guest.read_file(f"{MNT}/file") == "hello\n"
    guest.run(f"umount {MNT} && systemctl stop ublkd@vol0 && umount /var/lib/ublkd "
              f"/srv/images")


@pytest.mark.kernels("6.12", "6.18")
def test_abort_mode_fails_only_in_flight_writes_and_keeps_acknowledged_ones(systemd_guest,
                                                                            report):
    """recovery = "abort" on the raw device: requests the dead daemon had
    taken fail with EIO (at most one per writer per kill, as each writer has
    one request in flight), and every acknowledged write reads back."""
    guest = systemd_guest
    threads, kills = 8, 5
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n'
                                  f'recovery = "abort"\n')
    writer, box = run_in_background(
        guest, f"rm -f /tmp/stop; /usr/bin/python3 {CHECKOUT}/tests/guest/ackwriter.py "
               f"{status['device']} {threads} 4096 /tmp/stop")
    for _ in range(kills):
        guest.run("sleep 2")
        kill_worker_and_time_first_read(guest, "vol0", status["device"])
    guest.run("sleep 2; touch /tmp/stop")
    writer.join(600)
    assert box[0].rc == 0, box[0].describe()
    result = json.loads(box[0].stdout)
    assert result["bad"] == [], result
    assert result["errors"] <= threads * kills, result
    assert result["writes"] > 1000, result
    report(f"abort mode, {kills} kills: {result['writes']} writes acknowledged, "
           f"{result['errors']} failed with EIO, {len(result['bad'])} bad blocks")


def test_upgrade_hands_over_under_load_without_errors(systemd_guest, journal, report):
    """Three hand-overs in a row under fio: one in three once hung in the
    kernel (docs/kernel-notes.md), so one would prove little."""
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "256MiB"\n')
    dev = status["device"]
    before = devnum(guest, dev)
    fio, box = run_in_background(
        guest, f"fio --name=upgrade --filename={dev} --rw=randwrite --bs=4k --size=48M "
               f"--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 "
               f"--output-format=json")
    pids = [status["pid"]]
    for _ in range(3):
        guest.run("sleep 2")
        out = ublkd(guest, "upgrade", "vol0", timeout=180).stdout
        found = re.search(rf"vol0: {dev} handed over from pid {pids[-1]} to pid (\d+)", out)
        assert found, out
        pids.append(int(found.group(1)))
    fio.join(1800)
    assert box[0].rc == 0, box[0].describe()
    assert fio_jobs(box[0])[0]["error"] == 0
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert after["pid"] == pids[-1] and len(set(pids)) == 4 and after["state"] == "LIVE"
    assert after["generation"] == status["generation"] + 3
    assert devnum(guest, dev) == before
    unit = show(guest, "ublkd@vol0", "ActiveState", "Result")
    assert unit == {"ActiveState": "active", "Result": "success"}
    assert journal.of("ublkd@vol0").count("handed /dev/ublkb") == 3
    report(f"3 hand-overs under fio, serving pids {' -> '.join(map(str, pids))}, no I/O error")


def test_upgrade_to_a_broken_version_keeps_the_running_daemon(systemd_guest):
    """The successor starts first: when the new version cannot even start, the
    running daemon was never told to let go and serves on; `ublkd upgrade`
    says so (exit 9) instead of leaving the device to a broken restart."""
    guest = systemd_guest
    status = start(guest, "vol0", f'backend = "file"\npath = "{BACKING}"\nsize = "64MiB"\n')
    dev = status["device"]
    guest.run(f"echo kept | dd of={dev} bs=4096 conv=sync oflag=direct status=none")
    script = f"{CHECKOUT}/.venv/bin/ublkd"  # what the unit runs (make install-units)
    guest.run(f"cp -p {script} /run/ublkd.saved && "
              f"printf '#!/bin/sh\\necho new version broken >&2\\nexit 1\\n' > {script}")
    try:
        result = guest.run(f"{CHECKOUT}/.venv/bin/python -m ublkd upgrade vol0", check=False,
                           timeout=180)
    finally:
        guest.run(f"cp -p /run/ublkd.saved {script}")
    assert result.rc == 9, result.describe()
    assert "hand-over failed: the new ublkd exited with 1; still serving" in result.stderr
    after = json.loads(ublkd(guest, "status", "vol0", "--json").stdout)
    assert (after["pid"], after["state"], after["generation"]) == \
        (status["pid"], "LIVE", status["generation"])
    assert show(guest, "ublkd@vol0", "NRestarts")["NRestarts"] == "0"
    assert guest.run(f"timeout 60 dd if={dev} bs=4096 count=1 iflag=direct status=none | "
                     f"head -c 4").stdout == "kept"


def test_slow_backend_keeps_the_daemon_and_its_device(systemd_guest, journal):
    """The backing device stops answering for longer than WatchdogSec
    (device-mapper suspended) under fio through ext4: the daemon's loops
    still run, so it keeps pinging the watchdog and says in STATUS that the
    backend is late; once the disk answers again fio goes on, unharmed.
    Killing the daemon would not make the disk faster, and its restarts
    would end in give-up.  The unit's WatchdogSec (20 s) is 8 s here, so the
    stall outlasts it sooner: the daemon derives its limits from it."""
    guest = systemd_guest
    with watchdog_seconds(guest, 8):
        guest.run("truncate -s 256M /var/tmp/slow.img && losetup -f --show /var/tmp/slow.img "
                  "> /tmp/loopdev && dmsetup create ublkd-slow --table "
                  "\"0 524288 linear $(cat /tmp/loopdev) 0\"")
        try:
            status = start(guest, "vol0", 'backend = "file"\npath = "/dev/mapper/ublkd-slow"\n')
            dev = status["device"]
            main = show(guest, "ublkd@vol0", "MainPID")["MainPID"]
            application = FioThroughExt4(guest, dev, MNT)
            guest.run("sleep 2; dmsetup suspend ublkd-slow")
            wait_in_guest(guest, "systemctl show -p StatusText --value ublkd@vol0 | "
                                 "grep -q 'backend I/O unanswered'", 120)
            guest.run("sleep 12")  # longer than WatchdogSec=8s
            unit = show(guest, "ublkd@vol0", "MainPID", "NRestarts", "ActiveState")
            assert unit == {"MainPID": main, "NRestarts": "0", "ActiveState": "active"}
            assert application.thread.is_alive()
            guest.run("dmsetup resume ublkd-slow")
            application.finish()
            wait_in_guest(guest, "systemctl show -p StatusText --value ublkd@vol0 | "
                                 f"grep -qx '{dev} LIVE, file backend, recovered 0 times'", 60)
            log = journal.of("ublkd@vol0")
            assert "Watchdog timeout" not in log and "waiting for it" in log, log
            assert "the backend answers again" in log, log
        finally:
            guest.run(f"dmsetup resume ublkd-slow; umount -q {MNT}; systemctl stop ublkd@vol0; "
                      "dmsetup remove ublkd-slow; losetup -d $(cat /tmp/loopdev); true")
