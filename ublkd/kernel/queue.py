"""One hardware queue of a ublk device: where requests are served.

Each queue runs in its own thread with its own io_uring: the kernel ties a
queue's commands to the task that fetched them (others get EINVAL), and a
ring per queue keeps the queues from contending.  The ring carries both the
ublk commands and the backend's I/O, so one wait covers both.

Life of a tag: FETCH_REQ -> (kernel hands us a request) -> backend I/O ->
COMMIT_AND_FETCH_REQ with the result -> ... until the kernel answers ABORT
(device stopped, or the queue is being torn down).  Closing the ring
without that (`stop`) makes the kernel cancel the fetched commands itself.

The per-request work runs in C (`uring.QueueLoop`) for backends that have a
`fast_path`; this thread's Python sees only what is rare: ABORTs, errors,
requests of ops or backends the C loop does not serve, and a wake-up at
least every WAKE_INTERVAL for the heartbeat and `stop`.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
import time

from ublkd.backends import Backend, FastPath, Request
from ublkd.kernel import uapi
from ublkd.kernel.uring import BACKEND_IO, TAG_MASK, QueueLoop, Ring

log = logging.getLogger(__name__)

WAKE_INTERVAL = 1.0  # seconds: the loop comes back to Python at least this often
FETCH_TOGETHER_WAIT = 30.0  # seconds a queue waits for the others to be ready to fetch
DESCRIPTOR = struct.Struct("<IIQQ")  # struct ublksrv_io_desc


class Queue:
    """Serves queue `q_id` of a device, in two steps.

    `start` runs the thread, which makes the queue's ring, buffers and
    backend connection and then waits; `attach` hands it the device's
    /dev/ublkcN, which a recovering server may open only after
    START_USER_RECOVERY: from then on the device's I/O waits for us, so
    everything that can be ready before is (measured in
    docs/performance.md, "A sixth look").
    """

    def __init__(self, q_id: int, depth: int, buffer_size: int,
                 backend: Backend, fetch_op: int, commit_op: int,
                 need_get_data: bool = False, auto_buf_reg: bool = False,
                 backing_map: mmap.mmap | None = None,
                 fetch_together: threading.Barrier | None = None, poll_us: int = 0):
        self.char_fd = -1  # /dev/ublkcN, from attach
        self.q_id = q_id
        self.depth = depth
        self.buffer_size = buffer_size
        self.backend = backend
        self.fetch_op = fetch_op
        self.commit_op = commit_op
        # The device has UBLK_F_NEED_GET_DATA: buffers from a pool, not one per tag.
        self.need_get_data = need_get_data
        # The device has UBLK_F_AUTO_BUF_REG: zero copy, no buffers of ours.
        self.auto_buf_reg = auto_buf_reg
        # The device has UBLK_F_USER_COPY: requests are copied from and to this
        # mapping of the backing file (Backend.shared_mapping); no buffers.
        self.backing_map = backing_map
        # Every queue of the device sends its FETCHes at the same moment (see
        # _fetch_every_tag): shared by the device's queues, None alone.
        self.fetch_together = fetch_together
        # Poll this long after each completion before sleeping (config poll_us).
        self.poll_us = poll_us
        self.prepared = threading.Event()  # ring and backend ready, waiting for attach
        self.attached = threading.Event()  # attach (or leave) was called
        self.fetching = threading.Event()  # every tag fetched: the queue is ready
        self.stop = threading.Event()  # leave without waiting for ABORTs (never started)
        # Hand over to a successor: finish the requests in the server, take no
        # new work (what is fetched then stays with the kernel, which re-issues
        # it to the next server), leave.
        self.handover = _HandoverEvent(self)
        # Nothing of the device's is left in this queue: handed over, or the
        # thread has ended (QUIESCE_DEV may ABORT every tag before a hand-over
        # is asked, and the loop then ends by itself).
        self.handed_over = threading.Event()
        self.error: BaseException | None = None
        self.failed = threading.Event()  # the loop failed while serving; the ring stays open
        self.heartbeat = time.monotonic()  # the loop ran; for the watchdog
        self.thread = threading.Thread(target=self._run, name=f"ublk-queue-{q_id}", daemon=True)
        self._loop: QueueLoop | None = None

    def start(self) -> None:
        self.thread.start()

    def attach(self, char_fd: int) -> None:
        """Serve the device whose /dev/ublkcN is char_fd: FETCH every tag."""
        self.char_fd = char_fd
        self.attached.set()

    def leave(self) -> None:
        """End the thread without waiting for ABORTs (a device that never
        started, or one whose queues a stop ended), attached or not."""
        self.stop.set()
        self.attached.set()

    def backend_lost(self) -> tuple[float, int, bool] | None:
        """QueueLoop.backend_lost of the running loop."""
        return self._loop.backend_lost() if self._loop is not None else None

    def fail_waiting_io(self) -> None:
        """Before STOP_DEV: what waits for a lost backend server fails (EIO)."""
        if self._loop is not None:
            self._loop.fail_waiting_io()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Serving, or able to: False once the thread ended or failed."""
        return self.thread.is_alive() and not self.failed.is_set()

    def stalled_since(self) -> float | None:
        """time.monotonic() at which the oldest request still being served came in.

        None when the server holds no request (idle, or every request
        answered).  For the watchdog: a value far in the past means the
        backend stopped answering.  Cheap, callable from any thread: the C
        loop stamps each request as it dispatches it; this scans depth
        stamps.
        """
        loop = self._loop
        return loop.oldest_started() if loop is not None else None

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # reported to the daemon, which tears down
            log.exception("queue %d failed", self.q_id)
            self.error = exc
            if self.fetch_together is not None:
                self.fetch_together.abort()  # the other queues must not wait for this one
        finally:
            # Never leave a waiter hanging.
            self.prepared.set()
            self.fetching.set()
            self.handed_over.set()

    def _serve(self) -> None:
        # Anonymous memory: only the pages requests touch become resident
        # (one buffer per tag; with NEED_GET_DATA, a pool lent per request).
        buffers = mmap.mmap(-1, self.depth * self.buffer_size)
        try:
            with Ring(self._ring_entries(), single_issuer=True) as ring:
                get_data_op = need_get_data_opcode(self.commit_op) if self.need_get_data else None
                loop = QueueLoop(ring, self.q_id, self.depth, buffers, self.buffer_size,
                                 self.commit_op, get_data_op, auto_buf_reg=self.auto_buf_reg,
                                 user_copy=self.backing_map is not None,
                                 poll_us=self.poll_us)
                fast = self.backend.fast_path()
                try:
                    if fast is not None and not fast.connects:
                        self._use_fast_path(loop, fast)
                    self._loop = loop
                    self.prepared.set()
                    self.attached.wait()
                    if not self.stop.is_set():
                        if fast is not None and fast.connects:
                            self._use_fast_path(loop, fast)
                        self._serve_device(ring, loop)
                finally:
                    loop.close()
        finally:
            buffers.close()

    def _serve_device(self, ring: Ring, loop: QueueLoop) -> None:
        descriptors = mmap.mmap(self.char_fd, uapi.descriptor_length(self.depth),
                                mmap.MAP_SHARED, mmap.PROT_READ,
                                offset=uapi.descriptor_offset(self.q_id))
        try:
            loop.attach(self.char_fd, descriptors)
            self._serve_loop(ring, loop, descriptors)
        except Exception as exc:
            if self.fetching.is_set():
                self._stop_serving_with_the_ring_open(exc)
            raise
        finally:
            loop.close()  # it exports the descriptors' mapping
            descriptors.close()

    def _ring_entries(self) -> int:
        # Each tag has at most one ublk command and one backend I/O queued.
        entries = 1
        while entries < 2 * self.depth:
            entries *= 2
        return entries

    def _use_fast_path(self, loop: QueueLoop, fast: FastPath) -> None:
        if fast.kind == "file":
            loop.use_file_backend(fast.fd, inline=fast.inline, punch_hole=fast.punch_hole,
                                  zero_range=fast.zero_range, mapping=self.backing_map)
        elif fast.kind == "null":
            loop.use_null_backend()
        elif fast.kind == "rbd":
            loop.use_rbd_backend(fast.image)
        elif fast.kind == "nbd":
            waiting = loop.use_nbd_backend(fast.uri, f"{fast.name}-q{self.q_id}",
                                           fast.reconnect_timeout)
            if waiting:
                log.warning("queue %d: NBD server of %s not reachable (%s); I/O waits while "
                            "it reconnects", self.q_id, fast.uri, waiting)
        else:
            raise ValueError(f"unknown fast path kind {fast.kind!r}")

    def _fetch_every_tag(self, ring: Ring, loop: QueueLoop) -> None:
        """FETCH each tag, in one submission, when every other queue is ready to.

        The 6.12 driver oopses (a NULL task in ublk_queue_reinit) on a
        START_USER_RECOVERY after a recovery that died when some queues had
        fetched every tag and others had not (seen in the guest,
        docs/kernel-notes.md).  Sending all queues' FETCHes at one moment
        shrinks that window from the threads' whole start-up to the gap
        between their submissions.
        """
        for tag in range(self.depth):
            loop.fetch(self.fetch_op, tag)
        if self.fetch_together is not None:
            self.fetch_together.wait(FETCH_TOGETHER_WAIT)
        ring.submit()

    def _serve_loop(self, ring: Ring, loop: QueueLoop, descriptors: mmap.mmap) -> None:
        self._fetch_every_tag(ring, loop)
        self.fetching.set()
        log.debug("queue %d: fetching %d tags", self.q_id, self.depth)
        active = self.depth
        while active and not self.stop.is_set():
            if self.handover.is_set():
                loop.hand_over()
                if not loop.busy:
                    ring.submit()  # the last commits
                    log.info("queue %d: requests in flight answered, handing over", self.q_id)
                    self._stay_until_process_exit()
            events = loop.serve(WAKE_INTERVAL)
            self.heartbeat = time.monotonic()
            for user_data, result in events:
                tag = user_data & TAG_MASK
                if result == uapi.UBLK_IO_RES_OK:
                    # Dispatched by the C loop before any hand-over: serve it.
                    self._dispatch(ring, loop, descriptors, tag)
                elif result == uapi.UBLK_IO_RES_ABORT:
                    active -= 1
                else:
                    log.error("queue %d tag %d: ublk command failed: %d", self.q_id, tag, result)
                    active -= 1
        if not active:
            # Every tag came back (STOP_DEV or QUIESCE_DEV): nothing uses the
            # ring's files any more.  Dropped here, /dev/ublkcN and the
            # backing file's lock go with this process; left to the ring's
            # teardown, they went 7-25 ms after it (70+ ms now and then),
            # and a successor waits for both (docs/performance.md).
            ring.unregister_files()

    def _stop_serving_with_the_ring_open(self, error: Exception) -> None:
        """A queue that fails while it serves (its ring call refused, say)
        keeps its ring open, for the reason _stay_until_process_exit gives:
        one ring closed while the other queues served left the 6.12 driver's
        quiesce waiting forever, and the next worker's START_USER_RECOVERY
        with it (seen in the guest in 2 full test runs of 3,
        test_a_failed_queue_ends_the_worker_like_a_crash...).  The daemon
        sees `alive` turn False and ends the process like a crash, which
        closes every ring at once; a stop (join_queues) lets the thread go."""
        log.error("queue %d failed while serving", self.q_id, exc_info=error)
        self.error = error
        self.failed.set()
        self.stop.wait()

    def _stay_until_process_exit(self) -> None:
        """After a hand-over the ring must not be closed by this thread alone.

        Closing the queues' rings one at a time, while other queues still
        served, left the 6.12 driver's quiesce waiting forever (holding the
        device's mutex, so the successor's START_USER_RECOVERY hung) in about
        one upgrade in three; a process that dies with every ring open, as a
        killed one does, never did.  So the thread parks here and the
        process's exit (right after the hand-over) tears all rings down.
        """
        self.handed_over.set()
        threading.Event().wait()

    def _dispatch(self, ring: Ring, loop: QueueLoop, descriptors: mmap.mmap, tag: int) -> None:
        """A request the C loop left to the backend's `submit`."""
        op_flags, nr_sectors, start_sector, _ = DESCRIPTOR.unpack_from(descriptors, tag * 24)
        request = Request(op=op_flags & 0xFF, offset=start_sector << 9,
                          length=nr_sectors << 9, buffer=loop.buffer(tag))
        result = self.backend.submit(ring, request, tag | BACKEND_IO)
        if result is not None:
            loop.commit(tag, result)


def need_get_data_opcode(commit_op: int) -> int:
    """NEED_GET_DATA in the same encoding (legacy or ioctl) as commit_op."""
    return (uapi.UBLK_U_IO_NEED_GET_DATA if commit_op == uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ
            else uapi.UBLK_IO_NEED_GET_DATA)


class _HandoverEvent(threading.Event):
    """Queue.handover: setting it also tells the C loop at once, from any thread."""

    def __init__(self, queue: Queue):
        super().__init__()
        self._queue = queue

    def set(self) -> None:
        super().set()
        loop = self._queue._loop
        if loop is not None:
            loop.hand_over()
