"""fio in the guest: ublkd against the kernel's own drivers, in one run.

    .venv/bin/python -m benchmarks.bench [--kernel 6.12|6.18] [--quick] [--runtime S]
                                         [--backings disk,tmpfs]
                                         [--kills N] [--kill-kinds worker,main,unit]
                                         [--json FILE]
    .venv/bin/python -m benchmarks.bench --targets none --backings disk --kill-kinds unit
                                         (the whole-unit recovery gap alone)

Jobs (fio, io_uring engine, O_DIRECT, one job): 4k randread and randwrite
at iodepth 1, 32 and 128; 128k sequential read and write at iodepth 32.

Targets, all in the same guest, on the same backing file per backing:
  ublkd-file     ublkd's file backend (2 queues of depth 128); zero copy where
                 the kernel has UBLK_F_AUTO_BUF_REG (6.16+), on tmpfs one copy
                 through the mapped file (UBLK_F_USER_COPY, 6.5+)
  ublkd-copy     the same with zero_copy = false: the buffers of NEED_GET_DATA,
                 for the before/after (only where zero_copy changes anything)
  loop           /dev/loopN on the same file with direct I/O: the reference
  file           fio's io_uring engine straight on the backing file: the limit
  ublkd-null     ublkd's null backend
  null_blk       the kernel's null_blk (no interrupts): the reference for ublkd-null
  ublkd-nbd      ublkd's nbd backend on qemu-nbd (the disk's file) and nbdkit memory
  ublkd-nbd-poll the same with poll_us = 1000: queue threads that poll
                 instead of sleeping while I/O flows
  kernel-nbd     the kernel's NBD client (nbd-client -C 2): the reference for ublkd-nbd
  fio-nbd        fio's nbd engine (libnbd, no kernel): the limit (benchmarks/nbd.py)
  ublkd-rbd      ublkd's rbd backend on a one-node Ceph cluster in the guest
  krbd           the kernel's RBD client (rbd device map): the reference for ublkd-rbd
  rbd-nbd        Ceph's rbd-nbd on the same image (benchmarks/rbd.py)
  fio-rbd        fio's rbd engine (librbd, no kernel, its cache off as in
                 ublkd): the limit for ublkd-rbd
Backings: "disk" = a file on ext4 on the guest's virtio disk (what a
server has), "tmpfs" = a file in /dev/shm, "overlay" = a file in /var/tmp
(the guest's tmpfs-backed overlay root).  For the ublkd targets the table
also shows the daemon's RSS after each job and its CPU time (user+system,
all threads, from /proc/PID/stat) per I/O the device completed (from
/sys/block/ublkbN/stat).

Recovery gap: with the file backend, N times kill -9 the worker that serves
(the main process forks a new one), then N times kill -9 `ublkd serve` itself
and start it again (no systemd), then N times kill the whole unit ublkd@NAME
(`systemctl kill -s KILL`; systemd restarts it), and time each kill to the
first completed read after it (benchmarks/recovery_gap.py, in the guest).

Times in the guest are emulated (TCG): only ratios within one run mean
anything, which is why every number is printed next to its reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import nbd, rbd
from tests.guest.serving import UBLKD, fio_jobs, ublkd, write_config
from tests.testbed import Guest, GuestConfig, GuestError, prepare
from tests.testbed.provision import KERNEL_LINES

CHECKOUT = Path(__file__).resolve().parents[1]
SIZE = "512MiB"
SIZE_BYTES = 512 << 20
QUEUES = 2
DEPTH = 128
DEV_ID = 77  # /dev/ublkb77: the recovery script finds the device without asking ublkd
DISK_IMAGE = CHECKOUT / "build" / "bench-disk.img"
DISK = "/dev/disk/by-id/virtio-disk0"
BACKINGS = {
    "disk": "/mnt/bench/bench.img",
    "tmpfs": "/dev/shm/bench.img",
    "overlay": "/var/tmp/bench.img",
}


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int


JOBS = [
    Job("4k randread qd1", "randread", "4k", 1),
    Job("4k randread qd32", "randread", "4k", 32),
    Job("4k randread qd128", "randread", "4k", 128),
    Job("4k randwrite qd1", "randwrite", "4k", 1),
    Job("4k randwrite qd32", "randwrite", "4k", 32),
    Job("4k randwrite qd128", "randwrite", "4k", 128),
    Job("128k read qd32", "read", "128k", 32),
    Job("128k write qd32", "write", "128k", 32),
]

TARGETS = ("ublkd-file", "ublkd-copy", "loop", "file", "ublkd-null", "null_blk", *nbd.TARGETS,
           *rbd.TARGETS)
KILL_KINDS = ("worker", "main", "unit")  # benchmarks/recovery_gap.py --kill

# target -> the one its ratio is taken against
REFERENCE = {"ublkd-file": "loop", "ublkd-copy": "loop", "ublkd-null": "null_blk",
             "ublkd-nbd": "kernel-nbd", "ublkd-nbd-poll": "kernel-nbd", "ublkd-rbd": "krbd"}


@dataclass
class Sample:
    target: str
    backing: str
    job: str
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    ratio: float | None = None  # iops / the reference's iops, same job and backing
    reference: str | None = None
    rss_mib: float | None = None  # daemon VmRSS after the job
    cpu_us_per_io: float | None = None  # daemon user+system time per completed I/O


@dataclass
class Daemon:
    """A ublkd serve process in the guest, found by its pid."""

    guest: Guest
    pid: int
    device: str
    clock_ticks: int = 100

    def main_memory_kib(self) -> tuple[int, int]:
        """(VmRSS, PSS) of `ublkd serve` itself, the worker's parent (no device,
        no buffers) and the worker's PSS: the worker is forked, so the two
        share most pages, which VmRSS counts in each and PSS splits.  Shared
        memory pages are left out: those of a tmpfs backing file mapped for
        UBLK_F_USER_COPY are the file's memory, there with or without us."""
        out = self.guest.run(
            f"main=$(ps -o ppid= -p {self.pid} | tr -d ' '); "
            f"grep '^VmRSS:' /proc/$main/status; "
            f"grep -E '^Pss(_Shmem)?:' /proc/$main/smaps_rollup; "
            f"grep -E '^Pss(_Shmem)?:' /proc/{self.pid}/smaps_rollup").stdout.split()
        rss = int(out[1])
        main_pss, main_shmem, worker_pss, worker_shmem = (int(out[i]) for i in (4, 7, 10, 13))
        return rss, main_pss - main_shmem + worker_pss - worker_shmem

    def snapshot(self) -> dict:
        out = self.guest.run(
            f"cat /proc/{self.pid}/stat; "
            f"grep -E '^(VmRSS|VmHWM|RssShmem):' /proc/{self.pid}/status; "
            f"cat /sys/block/{Path(self.device).name}/stat").stdout.splitlines()
        stat = out[0].rsplit(")", 1)[1].split()
        memory = {line.split(":")[0]: int(line.split()[1]) for line in out[1:4]}
        disk = [int(x) for x in out[4].split()]
        return {
            "cpu_s": (int(stat[11]) + int(stat[12])) / self.clock_ticks,  # utime, stime
            # Without shared memory: a mapped tmpfs backing file's pages (main_memory_kib).
            "rss_kib": memory["VmRSS"] - memory["RssShmem"],
            "hwm_kib": memory["VmHWM"],
            "ios": disk[0] + disk[4],  # reads, writes completed
        }


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    daemons: dict[str, dict] = field(default_factory=dict)  # target/backing -> idle/peak RSS
    recovery: dict[str, dict] = field(default_factory=dict)  # kill kind -> gaps
    nbd_faults: list[dict] = field(default_factory=list)  # benchmarks/nbd.py
    rbd_faults: list[dict] = field(default_factory=list)  # benchmarks/rbd.py


def fio(guest: Guest, filename: str, job: Job, runtime: int, ramp: int) -> dict:
    result = guest.run(
        f"fio --name=bench --filename={filename} --rw={job.rw} --bs={job.bs} "
        f"--iodepth={job.iodepth} --ioengine=io_uring --direct=1 --time_based "
        f"--runtime={runtime} --ramp_time={ramp} --size={SIZE_BYTES} --output-format=json",
        timeout=runtime * 20 + 300,
    )
    return fio_jobs(result)[0]


def sample(target: str, backing: str, job: Job, fio_job: dict) -> Sample:
    side = fio_job["write"] if "write" in job.rw else fio_job["read"]
    percentiles = side["clat_ns"].get("percentile", {})
    return Sample(
        target=target, backing=backing, job=job.name,
        iops=side["iops"], mb_s=side["bw_bytes"] / 1e6,
        p50_us=percentiles.get("50.000000", 0) / 1000,
        p99_us=percentiles.get("99.000000", 0) / 1000,
    )


def measure(guest: Guest, target: str, backing: str, filename: str, args,
            daemon: Daemon | None = None) -> list[Sample]:
    samples = []
    for job in args.jobs:
        before = daemon.snapshot() if daemon else None
        s = sample(target, backing, job, fio(guest, filename, job, args.runtime, args.ramp))
        if daemon:
            after = daemon.snapshot()
            ios = after["ios"] - before["ios"]
            s.rss_mib = after["rss_kib"] / 1024
            s.cpu_us_per_io = (after["cpu_s"] - before["cpu_s"]) * 1e6 / ios if ios else None
        samples.append(s)
        extra = f"  RSS {s.rss_mib:.1f} MiB, {s.cpu_us_per_io:.0f} us CPU/IO" if daemon else ""
        print(f"  {target:11} {backing:8} {job.name:19} {s.iops:9.0f} IOPS{extra}",
              file=sys.stderr, flush=True)
    return samples


def no_scheduler(guest: Guest, device: str) -> None:
    """Every target without an I/O scheduler: the drivers are compared, not mq-deadline."""
    name = Path(guest.run(f"readlink -f {device}").stdout.strip()).name
    guest.run(f"echo none > /sys/block/{name}/queue/scheduler")


def prepare_backing(guest: Guest, backing: str) -> str:
    path = BACKINGS[backing]
    if backing == "disk":
        guest.run(f"udevadm settle; for i in $(seq 100); do test -b {DISK} && break; sleep 0.1; "
                  f"done")
        guest.run(f"mountpoint -q /mnt/bench || (mkfs.ext4 -q -F {DISK} && mkdir -p /mnt/bench "
                  f"&& mount {DISK} /mnt/bench)")
        no_scheduler(guest, DISK)
        # Written, not fallocated: reads of unwritten extents never reach the disk.
        guest.run(f"dd if=/dev/zero of={path} bs=1M count={SIZE_BYTES >> 20} oflag=direct "
                  f"status=none", timeout=1200)
    else:
        guest.run(f"rm -f {path} && fallocate -l {SIZE_BYTES} {path}")
    return path


def start_daemon(guest: Guest, name: str, config: str) -> Daemon:
    write_config(guest, name, config + f"queues = {QUEUES}\nqueue_depth = {DEPTH}\nid = {DEV_ID}\n")
    guest.run(f"setsid {UBLKD} serve {name} > /var/tmp/{name}.log 2>&1 < /dev/null &")
    device = f"/dev/ublkb{DEV_ID}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = guest.run([UBLKD, "status", name, "--json"], check=False)
        if status.rc == 0 and json.loads(status.stdout).get("state") == "LIVE":
            guest.run(f"udevadm settle; test -b {device}")
            no_scheduler(guest, device)
            ticks = int(guest.run("getconf CLK_TCK").stdout)
            return Daemon(guest, json.loads(status.stdout)["pid"], device, ticks)
        time.sleep(1)
    log = guest.run(f"cat /var/tmp/{name}.log").stdout
    raise RuntimeError(f"ublkd serve {name} not LIVE:\n{log}\nlast status: "
                       f"{status.describe()}")


def stop_daemon(guest: Guest, daemon: Daemon) -> None:
    guest.run(f"kill -TERM {daemon.pid}; "
              f"while kill -0 {daemon.pid} 2>/dev/null; do sleep 0.2; done",
              timeout=300)


def bench_file(guest: Guest, backing: str, args, run: Run) -> None:
    path = prepare_backing(guest, backing)
    features = guest.run([UBLKD, "features", "--json"]).stdout
    # Whether `zero_copy` changes anything here (DeviceConfig.copy_flags).
    zero_copy = "AUTO_BUF_REG" in features or (backing == "tmpfs" and "USER_COPY" in features)
    for target, extra in (("ublkd-file", ""), ("ublkd-copy", "zero_copy = false\n")):
        if target not in args.targets or (target == "ublkd-copy" and not zero_copy):
            continue
        daemon = start_daemon(guest, "bench", f'backend = "file"\npath = "{path}"\n{extra}')
        idle = daemon.snapshot()
        run.samples += measure(guest, target, backing, daemon.device, args, daemon)
        peak = daemon.snapshot()
        main_rss, both_pss = daemon.main_memory_kib()
        run.daemons[f"{target}/{backing}"] = {"idle_rss_mib": idle["rss_kib"] / 1024,
                                              "peak_rss_mib": peak["hwm_kib"] / 1024,
                                              "main_rss_mib": main_rss / 1024,
                                              "main_worker_pss_mib": both_pss / 1024}
        stop_daemon(guest, daemon)
    if "loop" in args.targets:
        loop = guest.run(f"losetup --direct-io=on --find --show {path}").stdout.strip()
        direct = guest.read_file(f"/sys/block/{Path(loop).name}/loop/dio").strip() == "1"
        no_scheduler(guest, loop)
        run.samples += measure(guest, "loop" if direct else "loop-buffered", backing, loop, args)
        guest.run(f"losetup -d {loop}")
    if "file" in args.targets:
        run.samples += measure(guest, "file", backing, path, args)


def bench_null(guest: Guest, args, run: Run) -> None:
    if "ublkd-null" in args.targets:
        daemon = start_daemon(guest, "benchnull", f'backend = "null"\nsize = "{SIZE}"\n')
        run.samples += measure(guest, "ublkd-null", "-", daemon.device, args, daemon)
        run.daemons["ublkd-null"] = {"peak_rss_mib": daemon.snapshot()["hwm_kib"] / 1024}
        stop_daemon(guest, daemon)
    if "null_blk" in args.targets:
        guest.run(f"modprobe null_blk nr_devices=1 queue_mode=2 irqmode=0 "
                  f"gb={max(1, SIZE_BYTES >> 30)} submit_queues={QUEUES}")
        no_scheduler(guest, "/dev/nullb0")
        run.samples += measure(guest, "null_blk", "-", "/dev/nullb0", args)
        guest.run("rmmod null_blk")


def bench_recovery(guest: Guest, backing: str, kills: int, kill: str) -> dict:
    path = BACKINGS[backing]
    write_config(guest, "benchrec", f'backend = "file"\npath = "{path}"\nqueues = {QUEUES}\n'
                                    f'queue_depth = {DEPTH}\nid = {DEV_ID}\n')
    if kill == "unit":
        guest.run(f"make -s -C {CHECKOUT} install-units")
    result = guest.run(
        [str(CHECKOUT / ".venv" / "bin" / "python"), "-m", "benchmarks.recovery_gap",
         "--ublkd", UBLKD, "--name", "benchrec", "--device", f"/dev/ublkb{DEV_ID}",
         "--kills", str(kills), "--kill", kill, "--log", f"/var/tmp/recovery-gap-{kill}.log"],
        cwd=str(CHECKOUT), check=False, timeout=kills * 30 + 300,
    )
    try:
        gap = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        gap = {"failure": f"recovery_gap.py: rc {result.rc}\n{result.stdout}\n{result.stderr}"}
    if gap.get("failure"):
        gap["ublkd_log"] = guest.run(f"tail -30 /var/tmp/recovery-gap-{kill}.log",
                                     check=False).stdout
        ublkd(guest, "delete", "benchrec", check=False, timeout=300)
    gap["backing"] = backing
    return gap


def apply_ratios(samples: list[Sample]) -> None:
    by_key = {(s.target, s.backing, s.job): s for s in samples}
    for s in samples:
        reference = REFERENCE.get(s.target)
        ref = by_key.get((reference, s.backing, s.job)) if reference else None
        if ref and ref.iops:
            s.ratio, s.reference = s.iops / ref.iops, reference


def table(samples: list[Sample]) -> str:
    lines = [(f"{'target':11}{'backing':9}{'job':20}{'IOPS':>9}{'MB/s':>8}{'p50 us':>9}"
              f"{'p99 us':>9}{'ratio':>16}{'RSS MiB':>9}{'CPU us/IO':>10}")]
    for s in samples:
        ratio = f"{s.ratio:.2f}x {s.reference}" if s.ratio is not None else ""
        rss = f"{s.rss_mib:.1f}" if s.rss_mib is not None else ""
        cpu = f"{s.cpu_us_per_io:.0f}" if s.cpu_us_per_io is not None else ""
        lines.append(f"{s.target:11}{s.backing:9}{s.job:20}{s.iops:9.0f}{s.mb_s:8.1f}"
                     f"{s.p50_us:9.0f}{s.p99_us:9.0f}{ratio:>16}{rss:>9}{cpu:>10}")
    return "\n".join(lines)


def summary(run: Run) -> str:
    lines = []
    ratios = {(s.backing, s.job): s.ratio for s in run.samples if s.target == "ublkd-file"}
    for backing in sorted({b for b, _ in ratios}):
        for job, goal in (("4k randread qd32", 0.8), ("4k randread qd1", 0.5)):
            r = ratios.get((backing, job))
            if r is not None:
                lines.append(f"goal {job} on {backing}: ublkd-file {r:.2f}x loop "
                             f"(goal >= {goal}): {'met' if r >= goal else 'NOT met'}")
    for target, rss in run.daemons.items():
        peak = rss["peak_rss_mib"]
        if "main_worker_pss_mib" in rss:  # the memory both processes of the daemon take
            judged = rss["main_worker_pss_mib"]
            measured = (f"main + worker {judged:.1f} MiB (PSS: their shared pages counted "
                        f"once; worker peak RSS {peak:.1f} MiB with any mapped backing file, "
                        f"main process RSS "
                        f"{rss['main_rss_mib']:.1f} MiB)")
        else:
            judged, measured = peak, f"worker peak RSS {peak:.1f} MiB"
        lines.append(f"goal memory {target} (2 queues x depth 128): {measured} (goal < 40): "
                     f"{'met' if judged < 40 else 'NOT met'}")
    what = {"worker": "worker killed, the main process forks a new one",
            "main": "`ublkd serve` killed and started again",
            "unit": "whole unit killed (`systemctl kill -s KILL`), systemd restarts it"}
    for kill, gap in run.recovery.items():
        if gap.get("median_s") is not None:
            lines.append(f"recovery gap, {what[kill]}, over {gap['kills']} kills "
                         f"({gap['backing']}): min {gap['min_s']:.2f} s, median "
                         f"{gap['median_s']:.2f} s, max {gap['max_s']:.2f} s (goal median < 2): "
                         f"{'met' if gap['median_s'] < 2 else 'NOT met'}; read errors: "
                         f"{len(gap['read_errors'])}")
        if gap.get("active_s"):  # the unit kind: systemctl's own latency is part of the gap
            lines.append(f"  kill to the unit's processes gone: median "
                         f"{statistics.median(gap['reaped_s']):.2f} s; to the unit active "
                         f"again with a new main process: median "
                         f"{statistics.median(gap['active_s']):.2f} s")
        if gap.get("daemon_recover_s"):
            lines.append(f"  of which the new worker's own recovery steps (START_USER_RECOVERY "
                         f"to END_USER_RECOVERY): median "
                         f"{statistics.median(gap['daemon_recover_s']):.2f} s")
        if gap.get("failure"):
            lines.append(f"recovery gap ({kill}): FAILED: {gap['failure']}\n"
                         f"{gap.get('ublkd_log', '')}")
    lines += nbd.goal_lines(run.samples) + nbd.fault_lines(run.nbd_faults)
    lines += rbd.goal_lines(run.samples) + rbd.fault_lines(run.rbd_faults)
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=tuple(KERNEL_LINES), default=None,
                        help="the test bed kernel (default: UBLKD_TESTBED_KERNEL, else 6.12)")
    parser.add_argument("--quick", action="store_true",
                        help="2 s per job (1 s ramp), the disk backing only, 5 kills")
    parser.add_argument("--runtime", type=int, help="seconds per fio job (default 10)")
    parser.add_argument("--ramp", type=int, help="fio ramp_time before measuring (default 2)")
    parser.add_argument("--backings", help="comma-separated: disk, tmpfs, overlay "
                                           "(default disk,tmpfs)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of the targets, or none (only the "
                             "recovery gap)")
    parser.add_argument("--jobs", help="comma-separated job names to keep, "
                                       "e.g. '4k randread qd32,4k randread qd1'")
    parser.add_argument("--kills", type=int, help="recovery gap: kills (default 20, 0 skips)")
    parser.add_argument("--kill-kinds", default=",".join(KILL_KINDS),
                        help="recovery gap: what is killed, comma-separated: worker, main, "
                             "unit (default all)")
    parser.add_argument("--nbd-servers", default=",".join(nbd.SERVERS),
                        help="NBD servers the nbd targets are measured on (default "
                             "qemu-nbd,nbdkit)")
    parser.add_argument("--no-nbd-faults", dest="nbd_faults", action="store_false",
                        help="skip the qemu-nbd restart under fio (ublkd-nbd, kernel-nbd)")
    parser.add_argument("--json", type=Path, default=CHECKOUT / "build" / "bench.json")
    args = parser.parse_args(argv)
    args.runtime = args.runtime or (2 if args.quick else 10)
    args.ramp = args.ramp if args.ramp is not None else (1 if args.quick else 2)
    args.backings = (args.backings or ("disk" if args.quick else "disk,tmpfs")).split(",")
    unknown = set(args.backings) - set(BACKINGS)
    if unknown:
        parser.error(f"unknown backing {', '.join(sorted(unknown))}; known: {', '.join(BACKINGS)}")
    args.targets = [] if args.targets == "none" else args.targets.split(",")
    args.kill_kinds = args.kill_kinds.split(",")
    args.nbd_servers = args.nbd_servers.split(",")
    for given, known, what in ((args.targets, TARGETS, "target"),
                               (args.kill_kinds, KILL_KINDS, "kill kind"),
                               (args.nbd_servers, nbd.SERVERS, "NBD server")):
        unknown = set(given) - set(known)
        if unknown:
            parser.error(f"unknown {what} {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(known)}")
    args.kills = args.kills if args.kills is not None else (5 if args.quick else 20)
    wanted = args.jobs.split(",") if args.jobs else [job.name for job in JOBS]
    unknown = set(wanted) - {job.name for job in JOBS}
    if unknown:
        parser.error(f"unknown job {', '.join(sorted(unknown))}; known: "
                     f"{', '.join(job.name for job in JOBS)}")
    args.jobs = [job for job in JOBS if job.name in wanted]
    return args


def power_off(guest: Guest) -> None:
    """Shut the guest down; one that no longer answers (seen on a host with a
    load of 10) is killed instead, so the numbers measured so far are kept."""
    try:
        guest.shutdown()
    except GuestError as error:
        print(f"  {error}; killing the guest", file=sys.stderr, flush=True)
        guest.kill()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = CHECKOUT / "build" / "testbed" / time.strftime("bench-%Y%m%d-%H%M%S")
    DISK_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    DISK_IMAGE.unlink(missing_ok=True)
    with open(DISK_IMAGE, "wb") as image:
        image.truncate(2 << 30)  # sparse; ext4 plus the 512 MiB file
    kernel = prepare(line=args.kernel)
    guest = Guest(kernel, log_dir, GuestConfig(disks=[DISK_IMAGE]))
    started = time.monotonic()
    guest.boot()
    run = Run()
    try:
        for backing in args.backings:
            bench_file(guest, backing, args, run)
        bench_null(guest, args, run)
        if set(args.targets) & set(nbd.TARGETS):
            image = BACKINGS["disk"] if "disk" in args.backings else prepare_backing(guest,
                                                                                      "disk")
            nbd.bench_nbd(guest, image, args, run)
        if set(args.targets) & set(rbd.TARGETS):
            rbd.bench_rbd(guest, args, run)
        for kill in args.kill_kinds if args.kills else ():
            print(f"  recovery gap: {args.kills} kills ({kill}) ...",
                  file=sys.stderr, flush=True)
            run.recovery[kill] = bench_recovery(guest, args.backings[0], args.kills, kill)
    finally:
        power_off(guest)
        DISK_IMAGE.unlink(missing_ok=True)
    apply_ratios(run.samples)
    print(f"kernel {kernel.version}")
    print(table(run.samples))
    print()
    print(summary(run))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "kernel": kernel.version, "runtime_s": args.runtime, "ramp_s": args.ramp,
        "queues": QUEUES, "depth": DEPTH,
        "samples": [asdict(s) for s in run.samples], "daemons": run.daemons,
        "recovery": run.recovery, "nbd_faults": run.nbd_faults, "rbd_faults": run.rbd_faults,
        "wall_s": round(time.monotonic() - started),
    }, indent=2))
    print(f"\nJSON: {args.json}; guest logs: {log_dir}; "
          f"{(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
