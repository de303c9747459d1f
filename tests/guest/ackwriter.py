"""Runs in the guest: write blocks, remember which writes were acknowledged,
then check that every acknowledged block reads back intact.

    python3 ackwriter.py DEVICE THREADS BLOCKS STOPFILE

THREADS writers (each one request in flight, so at most THREADS requests
are in flight at any time) write 4 KiB blocks with O_DIRECT, each thread
over its own blocks, round after round, until STOPFILE exists.  A block's
content names its block number and the round, so a read tells which write
it holds.  Output (JSON): writes acknowledged, errors seen, and the blocks
whose content is neither the last acknowledged write nor a later write
that failed (for a failed write, the device may hold either version).
"""

import json
import mmap
import os
import sys
import threading

BLOCK = 4096


def content(block: int, round_: int) -> bytes:
    head = f"block {block} round {round_} ".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def writer(fd: int, first: int, step: int, blocks: int, stopfile: str, log: dict) -> None:
    buffer = mmap.mmap(-1, BLOCK)
    round_ = 0
    while not os.path.exists(stopfile):
        round_ += 1
        for block in range(first, blocks, step):
            buffer[:] = content(block, round_)
            try:
                os.pwrite(fd, buffer, block * BLOCK)
                log["acked"][block] = round_
                log["failed"].pop(block, None)
                log["writes"] += 1
            except OSError:
                log["failed"][block] = round_
                log["errors"] += 1
            if os.path.exists(stopfile):
                break


def main() -> None:
    device, threads, blocks, stopfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    logs = [{"acked": {}, "failed": {}, "writes": 0, "errors": 0} for _ in range(threads)]
    workers = [threading.Thread(target=writer, args=(fd, i, threads, blocks, stopfile, logs[i]))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    buffer = mmap.mmap(-1, BLOCK)
    bad = []
    for log in logs:
        for block, round_ in log["acked"].items():
            os.preadv(fd, [buffer], block * BLOCK)
            allowed = {content(block, round_)}
            if block in log["failed"]:
                allowed.add(content(block, log["failed"][block]))
            if bytes(buffer) not in allowed:
                bad.append(block)
    print(json.dumps({"writes": sum(log["writes"] for log in logs),
                      "errors": sum(log["errors"] for log in logs), "bad": bad}))


if __name__ == "__main__":
    main()
