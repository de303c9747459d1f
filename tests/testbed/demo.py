"""The demo: a ublk device survives its daemon being killed under load.

    make demo          (= .venv/bin/python -m tests.testbed demo)

It boots the test bed guest (Debian's 6.12 kernel, real ublk_drv, systemd
as PID 1), starts ublkd@demo, puts ext4 on /dev/ublkbN, writes files, then
kills the daemon with SIGKILL three times while fio writes and verifies
through the file system (the worker that serves twice, the whole daemon
once), and shows, step by step, that the device, the
mount and the data are still there.  Exit code 0 means every check held.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.guest.serving import (CHECKOUT, devnum, fio_jobs, kill_and_wait_live,
                                 kill_worker_and_time_first_read, run_in_background, show,
                                 start, ublkd)
from tests.testbed import Guest, prepare

MNT = "/mnt/demo"
KILLS = 3


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def check(condition: bool, what: str) -> None:
    say(f"    {'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        raise DemoFailed(what)


def demo(guest: Guest) -> None:
    say(f"guest up: kernel {guest.run('uname -r').stdout.strip()}, PID 1 is "
        f"{guest.run('cat /proc/1/comm').stdout.strip()}")
    guest.run(f"make -s -C {CHECKOUT} install-units")

    say("\n1. systemctl start ublkd@demo  (/etc/ublkd/demo.toml: 512 MiB file, recovery "
        "\"reissue\")")
    dev = start(guest, "demo", 'backend = "file"\npath = "/var/tmp/demo.img"\n'
                               'size = "512MiB"\nrecovery = "reissue"\n')["device"]
    status = json.loads(ublkd(guest, "status", "demo", "--json").stdout)  # what a user reads
    say(f"    {dev} is {status['state']}, served by pid {status['pid']}")
    say("    " + ublkd(guest, "list").stdout.replace("\n", "\n    ").rstrip())

    say(f"\n2. ext4 on {dev}, mounted on {MNT}, 32 MiB of random files written")
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p {MNT} && mount {dev} {MNT}")
    guest.run(f"mkdir {MNT}/files && for i in $(seq 8); do "
              f"head -c 4M /dev/urandom > {MNT}/files/f$i; done && sync")
    sums = guest.run(f"cd {MNT}/files && sha256sum f*").stdout
    numbers = devnum(guest, dev)
    say(f"    device number {numbers}; checksums recorded")

    say(f"\n3. fio writes and verifies through the file system; meanwhile the daemon "
        f"is killed with SIGKILL {KILLS} times")
    fio, box = run_in_background(
        guest, f"fio --name=load --directory={MNT} --rw=randwrite --bs=4k --size=32M "
               f"--numjobs=2 --ioengine=libaio --iodepth=8 --direct=1 --fsync=32 "
               f"--verify=crc32c --verify_fatal=1 --output-format=json")
    for kill in range(1, KILLS + 1):
        guest.run("sleep 2")
        say(f"    kill {kill}: {kill_one(guest, dev, whole_daemon=kill % 2 == 0)}")
        check(devnum(guest, dev) == numbers, f"{dev} still has device number {numbers}")
        check(f"{dev} {MNT} " in guest.read_file("/proc/mounts"), f"{MNT} still mounted")
    fio.join(1800)
    result = box[0]
    errors = [job["error"] for job in fio_jobs(result)] if result.rc == 0 else ["fio failed"]
    say("\n4. after the kills")
    check(result.rc == 0 and errors == [0, 0], "fio saw no I/O error and its verify is clean")
    check(guest.run(f"cd {MNT}/files && sha256sum f*").stdout == sums,
          "the files written before the kills have the same sha256")
    status = show(guest, "ublkd@demo", "ActiveState", "NRestarts", "StatusText")
    say(f"    systemctl: {status['ActiveState']}, NRestarts={status['NRestarts']}, "
        f"status \"{status['StatusText']}\"")
    guest.run(f"umount {MNT}")
    check(guest.run(f"e2fsck -fn {dev}", check=False).rc == 0, "e2fsck -fn finds nothing")

    say("\n5. systemctl stop ublkd@demo")
    guest.run("systemctl stop ublkd@demo")
    check(guest.run(f"test -e {dev}", check=False).rc == 1, f"{dev} is gone")
    check(ublkd(guest, "list", "--json").stdout.strip() == "[]", "ublkd list is empty")


def kill_one(guest: Guest, dev: str, whole_daemon: bool) -> str:
    """SIGKILL to the worker that serves (its parent forks a new one), or to
    the unit's main process (systemd restarts the unit); what happened."""
    old_main = show(guest, "ublkd@demo", "MainPID")["MainPID"]
    old_worker = json.loads(ublkd(guest, "status", "demo", "--json").stdout)["pid"]
    if whole_daemon:
        seconds = kill_and_wait_live(guest, "demo")
        what = (f"main process {old_main} killed, systemd restarted ublkd@demo, active "
                f"again after {seconds:.2f} s")
    else:
        seconds = kill_worker_and_time_first_read(guest, "demo", dev)
        what = (f"worker {old_worker} killed, main process {old_main} forked a new one, "
                f"a read completed {seconds:.2f} s after the kill")
    new_worker = json.loads(ublkd(guest, "status", "demo", "--json").stdout)["pid"]
    return f"{what} (guest time); worker {new_worker} serves {dev}"


def main() -> int:
    log_dir = CHECKOUT / "build" / "testbed" / time.strftime("demo-%Y%m%d-%H%M%S")
    say("booting the test bed guest (qemu, TCG; about 20-40 s) ...")
    guest = Guest(prepare(), log_dir)
    guest.boot()
    try:
        demo(guest)
    except DemoFailed as failure:
        say(f"\nDEMO FAILED: {failure}\nguest logs: {log_dir}")
        return 1
    finally:
        guest.shutdown()
    say(f"\nDEMO PASSED: the device outlived {KILLS} kills of its daemon with its file "
        f"system mounted and no data lost.\nguest logs: {Path(log_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
