"""fio in the guest: ublkd against the kernel's own drivers, in one run.

    .venv/bin/python -m benchmarks.bench [--runtime S] [--json FILE]

Targets, all on the same guest and the same backing file:
  ublkd-file   ublkd's file backend on /var/tmp/bench.img
  loop         /dev/loopN on the same file (direct I/O when the file allows)
  ublkd-null   ublkd's null backend
  null_blk     the kernel's null_blk (no interrupts), the floor for ublkd-null
Times in the guest are emulated (TCG): only ratios within one run mean
anything, which is why every number is printed next to its reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.guest.serving import ServedDevice, fio_jobs, write_config
from tests.testbed import Guest, prepare

CHECKOUT = Path(__file__).resolve().parents[1]
BACKING = "/var/tmp/bench.img"
SIZE = "1GiB"


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int


JOBS = [
    Job("4k randread qd32", "randread", "4k", 32),
    Job("4k randwrite qd32", "randwrite", "4k", 32),
]


@dataclass
class Sample:
    target: str
    job: str
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float


def run_fio(guest: Guest, device: str, job: Job, runtime: int) -> dict:
    result = guest.run(
        f"fio --name=bench --filename={device} --rw={job.rw} --bs={job.bs} "
        f"--iodepth={job.iodepth} --ioengine=io_uring --direct=1 --time_based "
        f"--runtime={runtime} --ramp_time=2 --size=512M --output-format=json",
        timeout=runtime * 10 + 120,
    )
    return fio_jobs(result)[0]


def sample(target: str, job: Job, fio_job: dict) -> Sample:
    side = fio_job["read"] if "read" in job.rw else fio_job["write"]
    percentiles = side["clat_ns"].get("percentile", {})
    return Sample(
        target=target,
        job=job.name,
        iops=side["iops"],
        mb_s=side["bw_bytes"] / 1e6,
        p50_us=percentiles.get("50.000000", 0) / 1000,
        p99_us=percentiles.get("99.000000", 0) / 1000,
    )


def measure(guest: Guest, target: str, device: str, runtime: int) -> list[Sample]:
    samples = []
    for job in JOBS:
        samples.append(sample(target, job, run_fio(guest, device, job, runtime)))
        print(f"  {target:11} {job.name:20} {samples[-1].iops:10.0f} IOPS", file=sys.stderr)
    return samples


def bench_file_targets(guest: Guest, runtime: int) -> list[Sample]:
    guest.run(f"rm -f {BACKING} && fallocate -l {SIZE} {BACKING}")
    write_config(guest, "bench", f'backend = "file"\npath = "{BACKING}"\n')
    device = ServedDevice(guest, "bench").start()
    samples = measure(guest, "ublkd-file", device.path, runtime)
    device.stop()
    loop = guest.run(f"losetup --direct-io=on --find --show {BACKING}").stdout.strip()
    direct = guest.read_file(f"/sys/block/{Path(loop).name}/loop/dio").strip() == "1"
    samples += measure(guest, "loop" if direct else "loop-buffered", loop, runtime)
    guest.run(f"losetup -d {loop}")
    return samples


def bench_null_targets(guest: Guest, runtime: int) -> list[Sample]:
    write_config(guest, "benchnull", f'backend = "null"\nsize = "{SIZE}"\n')
    device = ServedDevice(guest, "benchnull").start()
    samples = measure(guest, "ublkd-null", device.path, runtime)
    device.stop()
    guest.run("modprobe null_blk nr_devices=1 queue_mode=2 irqmode=0 gb=1")
    samples += measure(guest, "null_blk", "/dev/nullb0", runtime)
    guest.run("rmmod null_blk")
    return samples


REFERENCE = {"ublkd-file": ("loop", "loop-buffered"), "ublkd-null": ("null_blk",)}


def table(samples: list[Sample]) -> str:
    by_key = {(s.target, s.job): s for s in samples}
    lines = [f"{'target':14}{'job':20}{'IOPS':>10}{'MB/s':>9}{'p50 us':>9}{'p99 us':>9}"
             f"{'ratio':>14}"]
    for s in samples:
        ratio = ""
        for reference in REFERENCE.get(s.target, ()):
            ref = by_key.get((reference, s.job))
            if ref and ref.iops:
                ratio = f"{s.iops / ref.iops:.2f}x {reference}"
        lines.append(f"{s.target:14}{s.job:20}{s.iops:10.0f}{s.mb_s:9.1f}{s.p50_us:9.0f}"
                     f"{s.p99_us:9.0f}{ratio:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--json", type=Path, default=CHECKOUT / "build" / "bench.json")
    args = parser.parse_args(argv)
    log_dir = CHECKOUT / "build" / "testbed" / time.strftime("bench-%Y%m%d-%H%M%S")
    guest = Guest(prepare(), log_dir)
    guest.boot()
    try:
        samples = bench_file_targets(guest, args.runtime) + bench_null_targets(guest, args.runtime)
    finally:
        guest.shutdown()
    print(table(samples))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(s) for s in samples], indent=2))
    print(f"\nJSON: {args.json}; guest logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
