"""A stand-in for the kernel's side of a ublk queue, for tests of the C serving
loop on the host's io_uring (tests/unit/test_queue_loop.py has the why)."""

from __future__ import annotations

import errno
import mmap
import struct
import time

from ublkd.kernel.uring import QueueLoop, Ring

DEPTH = 4
BUFFER = 64 * 1024
DESCRIPTOR = struct.Struct("<IIQQ")
COMMIT_OP = 0xC0107521
NOT_A_UBLK_DEVICE = -errno.EOPNOTSUPP  # what a regular file answers to the commit


class Harness:
    def __init__(self, char_fd: int, get_data_op: int | None = None, user_copy: bool = False,
                 poll_us: int = 0):
        # single_issuer: the flags of the daemon's queue rings (COOP_TASKRUN, TASKRUN_FLAG)
        self.ring = Ring(4 * DEPTH, single_issuer=True)
        self.descriptors = bytearray(DEPTH * 24)
        self.buffers = mmap.mmap(-1, DEPTH * BUFFER)
        self.scratch = bytearray(16)
        self.loop = QueueLoop(self.ring, 0, DEPTH, self.buffers, BUFFER, COMMIT_OP, get_data_op,
                              user_copy=user_copy, poll_us=poll_us)
        self.loop.attach(char_fd, self.descriptors)

    def request(self, tag: int, op: int, sector: int, sectors: int) -> None:
        """The kernel hands us a request on tag."""
        DESCRIPTOR.pack_into(self.descriptors, tag * 24, op, sectors, sector, 0)
        self.ring.prep_nop(tag)

    def events(self, count: int, timeout: float = 5) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got += self.loop.serve(0.5)
        return sorted(got)

    def buffer(self, tag: int, length: int) -> bytes:
        return self.buffers[tag * BUFFER: tag * BUFFER + length]

    def close(self) -> None:
        self.loop.close()
        self.ring.close()
        self.buffers.close()  # closable: the loop released it
