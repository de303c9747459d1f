"""The RBD part of `make bench`: ublkd's rbd backend against the kernel's
RBD client (krbd, `rbd device map`) and rbd-nbd (librbd behind the kernel's
NBD client) on the same image, and fio's rbd engine (librbd with no kernel
in the way and its cache off, as in ublkd: the limit for a librbd-based
server), plus what each daemon's death under fio does to applications.
rbd-nbd runs as users run it, with librbd's default cache.

The cluster: tests/guest/ceph-cluster (one monitor, one memstore OSD, cephx)
on the guest's loopback.  The image is written whole before the jobs, so
that reads reach the OSD (librbd and krbd answer a never-written object
with zeros themselves).  Every device has no I/O scheduler; ublkd serves
2 queues of depth 128, rbd-nbd and krbd take their defaults.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys

from tests.testbed import Guest

CLUSTER = "/run/bench-ceph"
CONF = f"{CLUSTER}/ceph.conf"
# fio's rbd engine with librbd's cache off, as ublkd runs it: with the
# default cache (write-around once a flush was seen) librbd answers writes
# before the OSD has them, and fio-rbd's 4k writes looked 1.3x krbd and 2x
# ublkd; same settings, they are 0.8-1.1x ublkd (docs/performance.md).
NO_CACHE_CONF = f"{CLUSTER}/no-cache.conf"
CEPH = f"CEPH_CONF={CONF} timeout 600"
IMAGE = "rbd/bench"
TARGETS = ("ublkd-rbd", "krbd", "rbd-nbd", "fio-rbd")
JOB_NAMES = ("4k randread qd1", "4k randread qd32", "4k randwrite qd1", "4k randwrite qd32",
             "128k read qd32", "128k write qd32")
# The goals: (job, reference, the least ratio of ublkd-rbd to it).
GOALS = [*((job, "rbd-nbd", 1.0) for job in JOB_NAMES),
         ("4k randread qd32", "krbd", 0.8), ("4k randwrite qd32", "krbd", 0.8)]
# Not goals: how close ublkd-rbd comes to librbd alone.
LIMITS = [("4k randread qd32", "fio-rbd"), ("4k randwrite qd32", "fio-rbd")]
KILLS = 5  # recovery gap: kill -9 of ublkd's worker, then a direct read
FAULT_FIO_S = 30


def start_cluster(guest: Guest, size_bytes: int) -> None:
    from benchmarks.bench import CHECKOUT

    guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster start {CLUSTER}", timeout=600)
    guest.run(f"sed 's/^\\[client\\]$/[client]\\nrbd_cache = false/' {CONF} > {NO_CACHE_CONF}")
    guest.run(f"{CEPH} rbd create {IMAGE} --size {size_bytes >> 20}M && {CEPH} rbd bench "
              f"--io-type write --io-size 4M --io-threads 4 --io-pattern seq "
              f"--io-total {size_bytes} {IMAGE} >/dev/null", timeout=1200)


def stop_cluster(guest: Guest) -> None:
    from benchmarks.bench import CHECKOUT

    guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster stop {CLUSTER}", check=False,
              timeout=300)


def ublkd_config() -> str:
    pool, image = IMAGE.split("/")
    return f'backend = "rbd"\npool = "{pool}"\nimage = "{image}"\nceph_conf = "{CONF}"\n'


def map_krbd(guest: Guest) -> str:
    device = guest.run(f"modprobe rbd && {CEPH} rbd device map {IMAGE}").stdout.strip()
    return device.splitlines()[-1]


def map_rbd_nbd(guest: Guest) -> str:
    guest.run("modprobe nbd nbds_max=4")
    return guest.run(f"{CEPH} rbd-nbd map {IMAGE}").stdout.strip().splitlines()[-1]


def unmap(guest: Guest, tool: str, device: str) -> None:
    command = "rbd device unmap" if tool == "krbd" else "rbd-nbd unmap"
    guest.run(f"{CEPH} {command} {device}", check=False)


def bench_rbd(guest: Guest, args, run) -> None:
    """Every target on the image, then the kill comparison."""
    from benchmarks.bench import SIZE_BYTES, measure, no_scheduler, start_daemon
    from tests.guest.serving import serving_pid_command

    args = copy.copy(args)
    args.jobs = [job for job in args.jobs if job.name in JOB_NAMES]
    start_cluster(guest, SIZE_BYTES)
    try:
        if "ublkd-rbd" in args.targets:
            daemon = start_daemon(guest, "benchrbd", ublkd_config())
            run.samples += measure(guest, "ublkd-rbd", "ceph", daemon.device, args, daemon)
            run.rbd_faults.append(recovery_gap(guest, daemon.device))
            # A new `ublkd serve`: the old one leaves the device to systemd
            # after 6 kills of its worker within 60 s (supervisor.py).
            stop_ublkd(guest)
            daemon = start_daemon(guest, "benchrbd", ublkd_config())
            run.rbd_faults.append(kill_under_fio(guest, "ublkd-rbd", daemon.device,
                                                 f"$({serving_pid_command('benchrbd')})"))
            stop_ublkd(guest)
        for tool, mapper in (("krbd", map_krbd), ("rbd-nbd", map_rbd_nbd)):
            if tool in args.targets:
                device = mapper(guest)
                no_scheduler(guest, device)
                run.samples += measure(guest, tool, "ceph", device, args)
                if tool == "rbd-nbd":
                    run.rbd_faults.append(kill_under_fio(guest, tool, device,
                                                         "$(pgrep -x rbd-nbd)"))
                unmap(guest, tool, device)
        if "fio-rbd" in args.targets:
            for job in args.jobs:
                run.samples.append(fio_rbd_engine(guest, job, args.runtime, args.ramp))
    finally:
        stop_cluster(guest)


def fio_rbd_engine(guest: Guest, job, runtime: int, ramp: int):
    from benchmarks.bench import sample

    pool, image = IMAGE.split("/")
    result = guest.run(
        f"CEPH_CONF={NO_CACHE_CONF} fio --name=bench --ioengine=rbd --clientname=admin "
        f"--pool={pool} --rbdname={image} --rw={job.rw} --bs={job.bs} --iodepth={job.iodepth} "
        f"--time_based --runtime={runtime} --ramp_time={ramp} --output-format=json",
        timeout=runtime * 20 + 300)
    s = sample("fio-rbd", "ceph", job, json.loads(result.stdout[result.stdout.index("{"):])[
        "jobs"][0])
    print(f"  {'fio-rbd':11} {'ceph':8} {job.name:19} {s.iops:9.0f} IOPS", file=sys.stderr,
          flush=True)
    return s


def stop_ublkd(guest: Guest) -> None:
    """SIGTERM to `ublkd serve` (its worker is a new one after the kills)."""
    # "[u]": the pattern must not match this shell's own command line.
    guest.run("pkill -TERM -f '[u]blkd serve benchrbd'; "
              "while pgrep -f '[u]blkd serve benchrbd' >/dev/null; do sleep 0.2; done",
              timeout=300)


def recovery_gap(guest: Guest, device: str) -> dict:
    """KILLS times: kill -9 the worker, time until a direct read completes."""
    from tests.guest.serving import kill_worker_and_time_first_read

    print(f"  ublkd-rbd: {KILLS} kills of the worker ...", file=sys.stderr, flush=True)
    gaps = []
    for _ in range(KILLS):
        gaps.append(kill_worker_and_time_first_read(guest, "benchrbd", device))
        guest.run("sleep 1")
    return {"client": "ublkd-rbd", "kind": "recovery gap", "gaps_s": gaps,
            "median_s": statistics.median(gaps)}


def kill_under_fio(guest: Guest, client: str, device: str, pid: str) -> dict:
    """fio 4k randwrite at iodepth 8 for FAULT_FIO_S s; the user-space daemon
    (ublkd's worker, or rbd-nbd; `pid` is shell) killed with SIGKILL after 5 s.  What fio
    saw: its errors and the longest stretch with no completed write."""
    from benchmarks.nbd import fault_outcome

    print(f"  {client}: kill -9 under fio ...", file=sys.stderr, flush=True)
    log = f"/tmp/fault-{client}"
    fio = (f"timeout -s KILL {FAULT_FIO_S + 60} fio --name=fault --filename={device} "
           f"--rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio --direct=1 --time_based "
           f"--runtime={FAULT_FIO_S} --size=256M --write_iops_log={log} --log_avg_msec=500 "
           f"--output-format=json > {log}.json 2>&1; echo $? > {log}.rc")
    guest.run(f"rm -f {log}*; setsid sh -c '{fio}' </dev/null >/dev/null 2>&1 &")
    guest.run(f"sleep 5; kill -KILL {pid}")
    guest.run(f"while ! test -f {log}.rc; do sleep 0.5; done", timeout=FAULT_FIO_S + 180)
    outcome = fault_outcome(guest, log)
    outcome["device_after"] = guest.run(
        f"timeout 30 dd if={device} of=/dev/null bs=4k count=1 iflag=direct 2>&1 | tail -1",
        check=False).stdout.strip()
    outcome.update(client=client, kind="kill -9 under fio")
    return outcome


def fault_lines(faults: list[dict]) -> list[str]:
    lines = []
    for fault in faults:
        if fault["kind"] == "recovery gap":
            gaps = ", ".join(f"{gap:.2f}" for gap in fault["gaps_s"])
            lines.append(f"rbd recovery gap, ublkd's worker killed, first read after: median "
                         f"{fault['median_s']:.2f} s ({gaps}) (goal median < 2): "
                         f"{'met' if fault['median_s'] < 2 else 'NOT met'}")
        elif fault["hung"]:
            lines.append(f"{fault['client']} killed under fio: fio hung, killed after "
                         f"{FAULT_FIO_S + 60} s")
        else:
            lines.append(f"{fault['client']} killed under fio: fio errors {fault['errors']}, "
                         f"longest stretch without a completed write "
                         f"{fault['longest_stall_s']:.1f} s; a read afterwards: "
                         f"{fault['device_after']}")
    return lines


def goal_lines(samples) -> list[str]:
    by_key = {(s.target, s.job): s.iops for s in samples if s.backing == "ceph"}
    lines = []
    for job, reference, least in GOALS:
        ours, theirs = by_key.get(("ublkd-rbd", job)), by_key.get((reference, job))
        if ours and theirs:
            ratio = ours / theirs
            lines.append(f"goal {job}: ublkd-rbd {ratio:.2f}x {reference} (goal >= {least}): "
                         f"{'met' if ratio >= least else 'NOT met'}")
    for job, limit in LIMITS:
        ours, theirs = by_key.get(("ublkd-rbd", job)), by_key.get((limit, job))
        if ours and theirs:
            lines.append(f"{job}: ublkd-rbd {ours / theirs:.2f}x {limit} (librbd alone); "
                         f"krbd {by_key.get(('krbd', job), 0) / theirs:.2f}x {limit}")
    return lines
