"""One hardware queue of a ublk device: where requests are served.

Each queue runs in its own thread with its own io_uring: the kernel ties a
queue's commands to the task that fetched them (others get EINVAL), and a
ring per queue keeps the queues from contending.  The ring carries both the
ublk commands and the backend's I/O, so one wait covers both.

Life of a tag: FETCH_REQ -> (kernel hands us a request) -> backend I/O ->
COMMIT_AND_FETCH_REQ with the result -> ... until the kernel answers ABORT
(device stopped, or the queue is being torn down).  Closing the ring
without that (`stop`) makes the kernel cancel the fetched commands itself.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
import threading
import time

from ublkd.backends import Backend, Request
from ublkd.kernel import uapi
from ublkd.kernel.uring import Ring

log = logging.getLogger(__name__)

BACKEND_IO = 1 << 32  # user_data bit: a backend completion, not a ublk command
TAG_MASK = 0xFFFF
WAKE_INTERVAL = 1.0  # seconds: an idle queue still wakes to beat and to see `stop`
DESCRIPTOR = struct.Struct("<IIQQ")  # struct ublksrv_io_desc


class Queue:
    """Serves queue `q_id` of the device whose /dev/ublkcN is `char_fd`."""

    def __init__(self, char_fd: int, q_id: int, depth: int, buffer_size: int,
                 backend: Backend, fetch_op: int, commit_op: int):
        self.char_fd = char_fd
        self.q_id = q_id
        self.depth = depth
        self.buffer_size = buffer_size
        self.backend = backend
        self.fetch_op = fetch_op
        self.commit_op = commit_op
        self.fetching = threading.Event()  # every tag fetched: the queue is ready
        self.stop = threading.Event()  # leave without waiting for ABORTs (never started)
        # Hand over to a successor: finish backend I/O in flight, take no new
        # work (what is fetched then stays with the kernel, which re-issues
        # it to the next server), leave.
        self.handover = threading.Event()
        self.error: BaseException | None = None
        self.heartbeat = time.monotonic()  # the loop ran; for the watchdog
        self.backend_started = [0.0] * depth  # per tag: when its backend I/O began
        self.thread = threading.Thread(target=self._run, name=f"ublk-queue-{q_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stalled_since(self) -> float | None:
        """When the oldest backend I/O still in flight began, or None."""
        started = [t for t in self.backend_started if t]
        return min(started) if started else None

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # reported to the daemon, which tears down
            log.exception("queue %d failed", self.q_id)
            self.error = exc
        finally:
            self.fetching.set()  # never leave a waiter hanging

    def _serve(self) -> None:
        offset = uapi.descriptor_offset(self.q_id)
        length = uapi.descriptor_length(self.depth)
        descriptors = mmap.mmap(self.char_fd, length, mmap.MAP_SHARED, mmap.PROT_READ,
                                offset=offset)
        buffers = mmap.mmap(-1, self.depth * self.buffer_size)
        anchor = ctypes.c_char.from_buffer(buffers)
        base = ctypes.addressof(anchor)
        try:
            with Ring(self._ring_entries(), single_issuer=True) as ring:
                self._loop(ring, descriptors, base)
        finally:
            del anchor
            buffers.close()
            descriptors.close()

    def _ring_entries(self) -> int:
        # Each tag has at most one ublk command and one backend I/O queued.
        entries = 1
        while entries < 2 * self.depth:
            entries *= 2
        return entries

    def _loop(self, ring: Ring, descriptors: mmap.mmap, base: int) -> None:
        buffer_size = self.buffer_size
        for tag in range(self.depth):
            ring.prep_ublk_io(self.char_fd, self.fetch_op, self.q_id, tag, 0,
                              base + tag * buffer_size, tag)
        ring.submit()
        self.fetching.set()
        log.debug("queue %d: fetching %d tags", self.q_id, self.depth)
        active = self.depth
        while active and not self.stop.is_set():
            if self.handover.is_set() and not any(self.backend_started):
                log.info("queue %d: backend I/O drained, handing over", self.q_id)
                return
            completions = ring.wait(1, timeout=WAKE_INTERVAL)
            self.heartbeat = time.monotonic()
            for user_data, result in completions:
                tag = user_data & TAG_MASK
                buffer = base + tag * buffer_size
                if user_data & BACKEND_IO:
                    self.backend_started[tag] = 0.0
                    self._commit(ring, tag, result, buffer)
                elif result == uapi.UBLK_IO_RES_OK:
                    if not self.handover.is_set():
                        self._dispatch(ring, descriptors, tag, buffer)
                elif result == uapi.UBLK_IO_RES_ABORT:
                    active -= 1
                else:
                    log.error("queue %d tag %d: ublk command failed: %d", self.q_id, tag, result)
                    active -= 1

    def _dispatch(self, ring: Ring, descriptors: mmap.mmap, tag: int, buffer: int) -> None:
        op_flags, nr_sectors, start_sector, _ = DESCRIPTOR.unpack_from(descriptors, tag * 24)
        request = Request(op=op_flags & 0xFF, offset=start_sector << 9,
                          length=nr_sectors << 9, buffer=buffer)
        result = self.backend.submit(ring, request, tag | BACKEND_IO)
        if result is None:
            self.backend_started[tag] = time.monotonic()
        else:
            self._commit(ring, tag, result, buffer)

    def _commit(self, ring: Ring, tag: int, result: int, buffer: int) -> None:
        ring.prep_ublk_io(self.char_fd, self.commit_op, self.q_id, tag, result, buffer, tag)
