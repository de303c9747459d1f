"""Run `ublkd serve` in the guest the way a user would, and look at the result.

The daemon runs as one long agent request in a host thread, so the test
gets its exit code and output when it ends, while other requests go on.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.testbed import Guest, GuestError, Result

CHECKOUT = Path(__file__).resolve().parents[2]
UBLKD = str(CHECKOUT / ".venv" / "bin" / "ublkd")
CONF_DIR = "/etc/ublkd"
STATE_DIR = "/var/lib/ublkd"


def ublkd(guest: Guest, *args: str, check: bool = True, **kwargs) -> Result:
    """Run the ublkd command in the guest."""
    return guest.run([UBLKD, *args], check=check, **kwargs)


def write_config(guest: Guest, name: str, text: str) -> None:
    guest.write_file(f"{CONF_DIR}/{name}.toml", text)


def fio_jobs(result: Result) -> list[dict]:
    """The jobs of fio's JSON output; fio may print warnings before it."""
    return json.loads(result.stdout[result.stdout.index("{"):])["jobs"]


def device_status(guest: Guest, name: str) -> dict | None:
    result = ublkd(guest, "status", name, "--json", check=False)
    return json.loads(result.stdout) if result.rc == 0 else None


def served_state(guest: Guest, name: str) -> dict | None:
    """`name`'s device as its state file says, once a live daemon serves it:
    the keys of `ublkd status --json` that the state file holds ("id",
    "device", "pid", "generation", "version"); None until then.

    Read with cat, not `ublkd status`: that is 1.5 s of Python under TCG,
    and tests waited for a device that way about 80 times a run.  A daemon
    writes the file before START_DEV (/dev/ublkbN appears) when it creates
    a device, after END_USER_RECOVERY when it recovers one, so a file
    naming a live pid and an existing block device means the device is
    served.  Tests that check what `ublkd status` says call it themselves.
    """
    path = f"{STATE_DIR}/{name}.json"
    found = guest.run(f"cat {path} 2>/dev/null", check=False)
    if found.rc != 0 or not found.stdout.strip():
        return None
    state = json.loads(found.stdout)
    device = f"/dev/ublkb{state['dev_id']}"
    if guest.run(f"test -b {device} && kill -0 {state['pid']}", check=False).rc != 0:
        return None
    return {"id": state["dev_id"], "device": device, "pid": state["pid"],
            "generation": state["generation"], "version": state["version"]}


class ServedDevice:
    """`ublkd serve NAME` running in the guest."""

    def __init__(self, guest: Guest, name: str):
        self.guest = guest
        self.name = name
        self.result: Result | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.status: dict = {}

    def _serve(self) -> None:
        self.result = ublkd(self.guest, "serve", self.name, check=False, timeout=3600)

    def start(self, timeout: float = 120) -> ServedDevice:
        """Start and wait until the device is LIVE; raises with the daemon's output if not."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = served_state(self.guest, self.name)
            if status:
                self.status = status
                self.guest.run(f"udevadm settle; test -b {self.path}")
                return self
            if not self.thread.is_alive():
                raise AssertionError(f"ublkd serve {self.name} ended early:\n"
                                     f"{self.result.describe()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not LIVE after {timeout} s")

    @property
    def dev_id(self) -> int:
        return self.status["id"]

    @property
    def path(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    @property
    def pid(self) -> int:
        return self.status["pid"]

    def kill(self, signal: str = "KILL") -> None:
        """Kill `ublkd serve` itself (the worker's parent), as a crash of the
        whole daemon would; the worker dies with it."""
        self.guest.run(f"kill -{signal} $(ps -o ppid= -p {self.pid})")
        self.thread.join(60)
        assert not self.thread.is_alive(), f"ublkd serve {self.name} survived SIGKILL"

    def stop(self, timeout: float = 120) -> Result:
        """SIGTERM, as systemctl stop would send; returns the daemon's result."""
        self.guest.run(f"kill -TERM {self.pid}")
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"ublkd serve {self.name} ignored SIGTERM"
        return self.result


def leftovers(guest: Guest) -> str:
    """What a failed or stopped daemon must not leave: devices, state files."""
    return guest.run(
        f"ls /sys/class/ublk-char/ 2>/dev/null; ls /dev/ | grep '^ublk[bc]' ; "
        f"ls {STATE_DIR} 2>/dev/null; true"
    ).stdout.strip()


def serve_without_library(guest: Guest, name: str, soname: str) -> Result:
    """`ublkd serve NAME` with the library `soname` hidden (/dev/null bound over
    it in a private mount namespace): what a machine without it sees."""
    library = guest.run(f"readlink -f $(ldconfig -p | awk '/{soname} /{{print $NF; exit}}')"
                        ).stdout.strip()
    return guest.run(f"unshare -m sh -c 'mount --bind /dev/null {library} && "
                     f"exec {UBLKD} serve {name}'", check=False, timeout=120)


def show(guest, unit: str, *properties: str) -> dict[str, str]:
    out = guest.run(["systemctl", "show", unit, "-p", ",".join(properties)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def start(guest, name: str, config: str) -> dict:
    """`systemctl start ublkd@NAME` with `config`; the device as served_state says."""
    write_config(guest, name, config)
    guest.run(f"systemctl start ublkd@{name}", timeout=180)
    status = served_state(guest, name)
    assert status, f"ublkd@{name} started, but no live daemon serves its state file's device"
    return status


def serving_pid_command(name: str) -> str:
    """Shell: the pid of the worker serving `name`, from its state file (no Python)."""
    return f"sed -n 's/^  \"pid\": \\([0-9]*\\).*/\\1/p' {STATE_DIR}/{name}.json"


def kill_and_wait_live(guest, name: str, signal: str = "KILL", timeout: int = 120,
                       who: str = "main") -> float:
    """Kill the unit's main process (who="main"), the worker that serves
    (who="worker") or every process of the unit at once (who="unit":
    `systemctl kill`, as the OOM killer of its cgroup would); return guest
    seconds until systemd has a new main process READY.

    Polls `systemctl show` (C, cheap) in a guest-side loop so the number is
    the guest's own clock, not the host's view through the agent.
    """
    kill = {"main": f"kill -{signal} $old",
            "worker": f"kill -{signal} $({serving_pid_command(name)})",
            "unit": f"systemctl kill -s {signal} $unit"}[who]
    script = f"""
        unit=ublkd@{name}.service
        old=$(systemctl show -p MainPID --value $unit)
        [ "$old" -gt 0 ] || {{ echo "no main pid"; exit 1; }}
        start=$(date +%s%N)
        {kill}
        while :; do
            pid=$(systemctl show -p MainPID --value $unit)
            state=$(systemctl show -p ActiveState --value $unit)
            sub=$(systemctl show -p SubState --value $unit)
            if [ "$pid" != "$old" ] && [ "$pid" -gt 0 ] && [ "$state" = active ] \\
               && [ "$sub" = running ]; then break; fi
            if [ $(( $(date +%s%N) - start )) -gt {timeout}000000000 ]; then
                echo "not back after {timeout} s: $state/$sub pid $pid"; exit 1
            fi
            sleep 0.05
        done
        echo $(( ($(date +%s%N) - start) / 1000000 ))
    """
    millis = guest.run(script, timeout=timeout + 60).stdout.strip().splitlines()[-1]
    return int(millis) / 1000


def kill_worker_and_time_first_read(guest, name: str, device: str, signal: str = "KILL",
                                    timeout: int = 120) -> float:
    """Kill the worker serving `name`; return guest seconds from the kill until
    a direct read of `device`, issued once the worker is gone, completes: the
    gap an application sees while the unit's main process forks a new worker."""
    script = f"""
        pid=$({serving_pid_command(name)})
        [ -n "$pid" ] || {{ echo "no serving pid"; exit 1; }}
        start=$(date +%s%N)
        kill -{signal} $pid
        while [ -e /proc/$pid ]; do sleep 0.01; done
        timeout {timeout} dd if={device} of=/dev/null bs=4k count=1 iflag=direct status=none \\
            || {{ echo "no read completed within {timeout} s"; exit 1; }}
        echo $(( ($(date +%s%N) - start) / 1000000 ))
    """
    millis = guest.run(script, timeout=timeout + 60).stdout.strip().splitlines()[-1]
    return int(millis) / 1000


class JournalSince:
    """The guest's journal from now on: what one test caused, not the earlier
    tests of the session guest (the same unit names come back in each)."""

    def __init__(self, guest: Guest):
        self.guest = guest
        out = guest.run("journalctl -n 0 --show-cursor -q").stdout
        self.cursor = out.split("cursor: ", 1)[1].strip()

    def of(self, unit: str) -> str:
        return self.guest.journal(f"--after-cursor={self.cursor}", "-u", unit)

    def command(self, unit: str) -> str:
        """Shell: the same, for polling in the guest."""
        return f"journalctl -q --after-cursor='{self.cursor}' -u {unit}"


def devnum(guest, path: str) -> str:
    return guest.run(f"stat -c %t:%T {path}").stdout.strip()


def run_in_background(guest, command: str, timeout: float = 1800):
    """Run `command` in the guest from a host thread; returns (thread, box)."""
    box: list[Result] = []

    def run() -> None:
        try:
            box.append(guest.run(command, check=False, timeout=timeout))
        except GuestError:
            pass  # the guest went away (power-cycled after a failure): box stays empty

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


SLOW_IO_MS = 20  # upgrade_under_fio lists the I/Os slower than this
# The I/Os the hand-over held complete together right after the successor's
# END_USER_RECOVERY; its journal line comes a few ms later.
HAND_OVER_WINDOW_MS = 100


def upgrade_under_fio(guest, name: str, status: dict, runtime: int = 15) -> dict:
    """`ublkd upgrade NAME` 3 s into fio's verified 4k random writes on the raw
    device `status` names (what start() returned): it must say it handed the
    device over, no write may fail nor read back wrong (verify_backlog: a
    time-based job never reaches fio's final verify phase), the device
    number must stay.  Returns fio's job, with from fio's per-I/O latency
    log "slow_ios": (completion time, latency in ms) of every I/O over
    SLOW_IO_MS (the job's verify reads too: the hand-over may hold those
    rather than writes), and "handed_over_at": when the successor said it
    serves again (times in ms since the epoch, the guest's clock).  The
    hand-over's I/O pause is what the I/Os completing then waited
    (hand_over_pause); the job's longest I/O may be something else: a stall
    of the emulated guest while a Python process starts was seen to hold
    writes for 145 ms with no hand-over at all."""
    dev = status["device"]
    before = devnum(guest, dev)
    lat_log = f"/tmp/upgrade-{name}"
    since = guest.run("date +%s.%N").stdout.strip()
    fio, box = run_in_background(
        guest, f"rm -f {lat_log}_*.log; timeout 600 fio --name=upgrade --filename={dev} "
               f"--rw=randwrite --bs=4k --size=32M --time_based --runtime={runtime} "
               f"--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c "
               f"--verify_backlog=256 --verify_fatal=1 --write_lat_log={lat_log} "
               f"--log_avg_msec=0 --log_unix_epoch=1 --output-format=json")
    guest.run("sleep 3")
    out = ublkd(guest, "upgrade", name, timeout=180).stdout
    assert re.search(rf"{name}: {dev} handed over from pid {status['pid']} to pid \d+",
                     out), out
    fio.join(900)
    assert box and box[0].rc == 0, box and box[0].describe()
    job = fio_jobs(box[0])[0]
    assert job["error"] == 0
    assert devnum(guest, dev) == before
    slow = guest.run(f"awk -F, '$2 > {SLOW_IO_MS * 1_000_000} {{print $1, $2}}' "
                     f"{lat_log}_clat.1.log").stdout.split("\n")
    job["slow_ios"] = [(int(at), int(ns) / 1e6) for at, ns in map(str.split, filter(None, slow))]
    served = guest.run(f"journalctl -u ublkd@{name} -o short-unix --since=@{since} "
                       f"| grep 'served again' | tail -n 1").stdout.split(" ", 1)[0]
    assert served, "the successor logged no \"served again\" line"
    job["handed_over_at"] = float(served) * 1000
    # Else the pause measured nothing: a hand-over that left the device 6 s
    # without a server once passed as "under 20 ms" after fio had ended.
    last_io = int(guest.run(f"tail -n 1 {lat_log}_clat.1.log").stdout.split(",")[0])
    assert last_io > job["handed_over_at"], \
        f"fio ended before the successor served: give it a longer runtime than {runtime} s"
    return job


def hand_over_pause(job: dict) -> str:
    """The longest wait of the I/Os that completed as the successor began to
    serve (upgrade_under_fio's job): the hand-over's I/O pause."""
    at = job["handed_over_at"]
    held = [ms for done, ms in job["slow_ios"] if abs(done - at) <= HAND_OVER_WINDOW_MS]
    return f"{max(held):.0f} ms" if held else f"under {SLOW_IO_MS} ms"


def describe_slow_ios(job: dict) -> str:
    """upgrade_under_fio's slow I/Os, grouped by completion time, relative
    to the hand-over: "16 x 40-44 ms at +3 ms; 11 x 33-166 ms at -3750 ms"."""
    origin = job["handed_over_at"]
    groups: list[list[tuple[int, float]]] = []
    for at, ms in sorted(job["slow_ios"]):
        if groups and at - groups[-1][-1][0] <= 5:
            groups[-1].append((at, ms))
        else:
            groups.append([(at, ms)])
    return "; ".join(f"{len(group)} x {min(ms for _, ms in group):.0f}-"
                     f"{max(ms for _, ms in group):.0f} ms at {group[0][0] - origin:+.0f} ms"
                     for group in groups) or "none"


def wait_in_guest(guest: Guest, condition: str, timeout: float,
                  explain: Callable[[], str] = lambda: "") -> None:
    """Poll the shell `condition` in the guest (every 0.2 s) until it holds;
    `explain()` adds what the failure report needs to be read from CI's
    output alone (the guest's logs stay on the machine that ran it)."""
    rounds = int(timeout / 0.2)
    result = guest.run(f"for i in $(seq {rounds}); do {{ {condition} ; }} && exit 0; "
                       f"sleep 0.2; done; exit 1", check=False, timeout=timeout * 3 + 60)
    assert result.rc == 0, f"not true after {timeout} s in the guest: {condition}\n{explain()}"


class FioThroughExt4:
    """An application on the device: ext4 made and mounted on `dev`, and fio
    (two jobs) writing and verifying files through it, round after round in
    the background until `finish()`.  What a test does meanwhile (kills,
    restarts, edits) must go unnoticed: `finish()` asserts every round's
    verify, the mount and the device number, then unmounts and runs e2fsck.

    Rounds, not one run sized to outlast the test's faults: fio is at work
    during every fault however fast the machine (a run that ended before
    the first kill would test nothing), and after the last fault the test
    waits for the round in flight only.  Each round has its own random seed,
    so its blocks, order and data differ from the round before: a write lost
    in a recovery cannot hide behind the same bytes written earlier.
    """

    ROUND_SIZE = "8M"  # per job and round: a few seconds of I/O in the guest

    def __init__(self, guest: Guest, dev: str, mount_point: str = "/mnt/vol0"):
        self.guest = guest
        self.dev = dev
        self.mount_point = mount_point
        self.devnum = devnum(guest, dev)
        self.stop_file = f"/tmp/fsverify-stop-{Path(mount_point).name}"
        self.output = f"/tmp/fsverify-{Path(mount_point).name}"
        guest.run(f"rm -f {self.stop_file} {self.output}-*.json; mkfs.ext4 -q {dev} && "
                  f"mkdir -p {mount_point} && mount {dev} {mount_point}")
        job = (f"fio --name=fsverify --directory={mount_point} --rw=randwrite --bs=4k "
               f"--size={self.ROUND_SIZE} --numjobs=2 --ioengine=libaio --iodepth=8 --direct=1 "
               f"--fsync=32 --verify=crc32c --verify_fatal=1 --randseed=$round "
               f"--output-format=json --output={self.output}-$round.json")
        self.thread, self.box = run_in_background(
            guest,
            f"round=0; while [ ! -e {self.stop_file} ]; do round=$((round + 1)); "
            f"{job} || {{ cat {self.output}-$round.json; exit 1; }}; done; echo rounds=$round")

    def finish(self) -> None:
        self.guest.run(f"touch {self.stop_file}")
        self.thread.join(1800)
        assert self.box, "fio did not finish its round within 30 minutes"
        result = self.box[0]
        assert result.rc == 0, result.describe()
        rounds = int(result.stdout.rsplit("rounds=", 1)[1])
        for round_ in range(1, rounds + 1):
            jobs = fio_jobs(self.guest.run(["cat", f"{self.output}-{round_}.json"]))
            assert [job["error"] for job in jobs] == [0, 0], f"fio round {round_}"
        assert devnum(self.guest, self.dev) == self.devnum
        assert f"{self.dev} {self.mount_point} ext4" in self.guest.read_file("/proc/mounts")
        self.guest.run(f"umount {self.mount_point} && e2fsck -fn {self.dev}")
