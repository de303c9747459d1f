"""The NBD part of `make bench`: ublkd's nbd backend against the kernel's own
NBD client on the same export, and fio's nbd engine (libnbd with no kernel in
the way: the limit for a libnbd-based server), plus what each client does
when the server is killed and started again under fio.

Servers, on unix sockets in the guest: qemu-nbd exporting the bench's raw
file on the guest's disk (`-e 0`: multi-conn), and `nbdkit memory`.  Both
block devices get 2 connections (ublkd: 2 queues; nbd-client: -C 2) and no
I/O scheduler; fio's nbd engine opens one connection per job.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
from dataclasses import dataclass

from tests.testbed import Guest

RUN = "/run/bench-nbd"
SOCKET = f"{RUN}/server.sock"
URI = f"nbd+unix:///?socket={SOCKET}"
KERNEL_DEVICE = "/dev/nbd0"
SERVERS = ("qemu-nbd", "nbdkit")
TARGETS = ("ublkd-nbd", "ublkd-nbd-poll", "kernel-nbd", "fio-nbd")
# ublkd-nbd-poll's poll_us: longer than a reply of these local servers takes
# in the guest (0.5-0.7 ms at iodepth 1), docs/performance.md "Polling".
POLL_US = 1000
UBLKD_TARGETS = {"ublkd-nbd": "", "ublkd-nbd-poll": f"poll_us = {POLL_US}\n"}
# The jobs: 4k random at iodepth 1 and 32, 128k sequential at 32.
JOB_NAMES = ("4k randread qd1", "4k randread qd32", "4k randwrite qd1", "4k randwrite qd32",
             "128k read qd32", "128k write qd32")
# The goals: (job, reference, the least ratio of ublkd-nbd to it).
GOALS = [*((job, "kernel-nbd", 1.0) for job in JOB_NAMES if job.startswith("4k")),
         *((job, "kernel-nbd", 0.8) for job in JOB_NAMES if job.startswith("128k")),
         ("4k randread qd32", "fio-nbd", 0.5)]


@dataclass
class Server:
    """One NBD server process in the guest, serving `URI`."""

    guest: Guest
    kind: str
    image: str

    def command(self) -> str:
        if self.kind == "qemu-nbd":
            return f"qemu-nbd -t -e 0 -f raw -k {SOCKET} {self.image}"
        return f"nbdkit -f -U {SOCKET} memory 512M"

    def start(self) -> None:
        self.guest.run(f"mkdir -p {RUN} && rm -f {SOCKET} && setsid {self.command()} "
                       f"</dev/null >{RUN}/{self.kind}.log 2>&1 &")
        self.guest.run(f"for i in $(seq 200); do nbdinfo --size '{URI}' >/dev/null 2>&1 && "
                       f"exit 0; sleep 0.1; done; cat {RUN}/{self.kind}.log; exit 1")

    def kill(self) -> None:
        self.guest.run(f"pkill -KILL -x {self.kind}; while pgrep -x {self.kind} >/dev/null; "
                       f"do sleep 0.1; done")


def connect_kernel_client(guest: Guest) -> str:
    guest.run("modprobe nbd nbds_max=2")
    guest.run(f"nbd-client -u {SOCKET} {KERNEL_DEVICE} -b 4096 -C 2 -N ''")
    guest.run(f"echo none > /sys/block/{KERNEL_DEVICE.rsplit('/', 1)[1]}/queue/scheduler")
    return KERNEL_DEVICE


def disconnect_kernel_client(guest: Guest) -> None:
    guest.run(f"nbd-client -d {KERNEL_DEVICE}", check=False, timeout=120)


def fio_nbd_engine(guest: Guest, job, runtime: int, ramp: int) -> dict:
    from benchmarks.bench import SIZE_BYTES

    result = guest.run(
        f"fio --name=bench --ioengine=nbd --uri='{URI}' --rw={job.rw} --bs={job.bs} "
        f"--iodepth={job.iodepth} --time_based --runtime={runtime} --ramp_time={ramp} "
        f"--size={SIZE_BYTES} --output-format=json", timeout=runtime * 20 + 300)
    return json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]


def bench_nbd(guest: Guest, image: str, args, run) -> None:
    """Every server, every target, then the fault comparison on qemu-nbd."""
    for kind in args.nbd_servers:
        bench_server(guest, kind, image, args, run)
    for client in ("ublkd-nbd", "kernel-nbd") if args.nbd_faults else ():
        if client in args.targets:
            print(f"  qemu-nbd restarted under fio, {client} ...", file=sys.stderr, flush=True)
            run.nbd_faults.append(server_restart_under_fio(guest, client, image))


def bench_server(guest: Guest, kind: str, image: str, args, run) -> None:
    from benchmarks.bench import measure, sample, start_daemon, stop_daemon

    args = copy.copy(args)
    args.jobs = [job for job in args.jobs if job.name in JOB_NAMES]
    server = Server(guest, kind, image)
    server.start()
    if kind == "qemu-nbd":  # every client then reads from the page cache, not the first alone
        guest.run(f"cat {image} > /dev/null", timeout=600)
    try:
        for target, extra in UBLKD_TARGETS.items():
            if target in args.targets:
                daemon = start_daemon(guest, "benchnbd",
                                      f'backend = "nbd"\nuri = "{URI}"\n{extra}')
                run.samples += measure(guest, target, kind, daemon.device, args, daemon)
                stop_daemon(guest, daemon)
        if "kernel-nbd" in args.targets:
            device = connect_kernel_client(guest)
            run.samples += measure(guest, "kernel-nbd", kind, device, args)
            disconnect_kernel_client(guest)
        if "fio-nbd" in args.targets:
            for job in args.jobs:
                s = sample("fio-nbd", kind, job, fio_nbd_engine(guest, job, args.runtime,
                                                                  args.ramp))
                run.samples.append(s)
                print(f"  {'fio-nbd':11} {kind:8} {job.name:19} {s.iops:9.0f} IOPS",
                      file=sys.stderr, flush=True)
    finally:
        server.kill()


# -- the server killed and started again under fio ----------------------------
OUTAGE_S = 5  # the server is away this long
FAULT_FIO_S = 30


def server_restart_under_fio(guest: Guest, client: str, image: str) -> dict:
    """fio 4k randwrite at iodepth 8 for FAULT_FIO_S s; qemu-nbd killed after
    5 s and started again OUTAGE_S s later.  Returns what fio saw: its errors,
    and the longest stretch with no completed I/O, from its own IOPS log
    (0.5 s buckets); a client whose fio never ends is reported as hung."""
    from benchmarks.bench import start_daemon, stop_daemon

    server = Server(guest, "qemu-nbd", image)
    server.start()
    daemon = None
    if client == "ublkd-nbd":
        daemon = start_daemon(guest, "benchnbd", f'backend = "nbd"\nuri = "{URI}"\n')
        device = daemon.device
    else:
        device = connect_kernel_client(guest)
    log = f"{RUN}/fault-{client}"
    fio = (f"timeout -s KILL {FAULT_FIO_S + 60} fio --name=fault --filename={device} "
           f"--rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio --direct=1 --time_based "
           f"--runtime={FAULT_FIO_S} --size=256M --write_iops_log={log} --log_avg_msec=500 "
           f"--output-format=json > {log}.json 2>&1; echo $? > {log}.rc")
    guest.run(f"rm -f {log}*; setsid sh -c '{fio}' </dev/null >/dev/null 2>&1 &")
    guest.run(f"sleep 5; pkill -KILL -x qemu-nbd; sleep {OUTAGE_S}")
    server.start()
    guest.run(f"while ! test -f {log}.rc; do sleep 0.5; done", timeout=FAULT_FIO_S + 180)
    outcome = fault_outcome(guest, log)
    if daemon:
        stop_daemon(guest, daemon)
    else:
        disconnect_kernel_client(guest)
    server.kill()
    outcome["client"] = client
    return outcome


def fault_outcome(guest: Guest, log: str) -> dict:
    rc = int(guest.read_file(f"{log}.rc").strip())
    if rc == 137:  # killed by timeout: its I/O never came back
        return {"hung": True, "errors": None, "longest_stall_s": None}
    text = guest.read_file(f"{log}.json")
    job = json.loads(text[text.index("{"):])["jobs"][0]
    buckets = guest.run(f"cat {log}_iops.*.log", check=False).stdout.splitlines()
    busy = sorted(int(line.split(",")[0]) for line in buckets if line.strip()
                  and int(line.split(",")[1]) > 0)
    stall = max((b - a for a, b in itertools.pairwise([*busy, FAULT_FIO_S * 1000])),
                default=FAULT_FIO_S * 1000) / 1000
    return {"hung": False, "errors": job["error"] or job.get("total_err", 0), "rc": rc,
            "longest_stall_s": stall, "write_iops": round(job["write"]["iops"])}


def fault_lines(faults: list[dict]) -> list[str]:
    lines = []
    for fault in faults:
        if fault["hung"]:
            what = f"fio hung: no I/O came back, killed after {FAULT_FIO_S + 60} s"
        else:
            what = (f"fio errors {fault['errors']}, longest stretch without a completed "
                    f"write {fault['longest_stall_s']:.1f} s (server away {OUTAGE_S} s)")
        lines.append(f"qemu-nbd killed and restarted under fio, {fault['client']}: {what}")
    return lines


def goal_lines(samples) -> list[str]:
    """The issue's goals, each met or not, for every server and ublkd target measured."""
    by_key = {(s.target, s.backing, s.job): s.iops for s in samples}
    lines = []
    for kind, target in itertools.product(SERVERS, UBLKD_TARGETS):
        for job, reference, least in GOALS:
            ours = by_key.get((target, kind, job))
            theirs = by_key.get((reference, kind, job))
            if ours and theirs:
                ratio = ours / theirs
                lines.append(f"goal {job} on {kind}: {target} {ratio:.2f}x {reference} "
                             f"(goal >= {least}): {'met' if ratio >= least else 'NOT met'}")
    return lines
