"""io_uring for ublkd: a small Ring class over liburing, cffi kept inside.

Nothing outside this module touches cffi.  A Ring is used by one thread at
a time (the kernel ties ublk queues to the thread that submits).  Every
``prep_*`` queues one SQE and returns at once; nothing reaches the kernel
before ``submit``/``submit_and_wait``/``wait``, except when the SQ is full:
then the queued SQEs are submitted to make room.  Completions come back as
``(user_data, res)`` pairs, ``res`` being what the kernel put in the CQE
(negative errno on failure): turning a failed request into an error is the
caller's business, only failures of the ring calls themselves raise.

``QueueLoop`` is the hot loop of one ublk queue, in C on top of a Ring: it
serves whole batches of requests without returning to Python (see
docs/performance.md for why and by how much).
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import Any

try:
    from ublkd.kernel._uring import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "ublkd.kernel._uring is not built: run ./scripts/bootstrap (or `pip install -e .`); "
        "building it needs liburing-dev and a C compiler"
    ) from exc

SETUP_SQE128 = lib.IORING_SETUP_SQE128
SETUP_COOP_TASKRUN = lib.IORING_SETUP_COOP_TASKRUN
SETUP_SINGLE_ISSUER = lib.IORING_SETUP_SINGLE_ISSUER
SETUP_TASKRUN_FLAG = lib.IORING_SETUP_TASKRUN_FLAG

# Tried in this order for single-issuer rings; a kernel that lacks a flag
# says EINVAL and the next, smaller set is tried.  TASKRUN_FLAG lets a
# polling queue loop see without a system call that the kernel has
# completions to post (ublkd_uring.c, "Polling").  Not DEFER_TASKRUN, which
# ublksrv adds: with it the kernel took 13-71 ms instead of 7-25 ms, after a
# hand-over's old worker exited, to let go of /dev/ublkcN (the successor's
# START_USER_RECOVERY waits for that), and no fio job was measurably faster
# (docs/performance.md, "A sixth look").
SINGLE_ISSUER_FALLBACKS = (
    SETUP_COOP_TASKRUN | SETUP_TASKRUN_FLAG | SETUP_SINGLE_ISSUER,  # 6.0
    SETUP_COOP_TASKRUN | SETUP_TASKRUN_FLAG,  # 5.19
    0,
)

CMD_AREA_64 = 16  # uring_cmd payload room in a 64-byte SQE (bytes 48-63)
CMD_AREA_128 = 80  # ... and in a 128-byte SQE (bytes 48-127)

SYNC_USER_DATA = (1 << 64) - 1  # tags the CQE of uring_cmd_sync

MAX_UINT32 = (1 << 32) - 1


def _raise(ret: int, call: str) -> None:
    """Turn a negative errno from liburing into OSError naming the call."""
    raise OSError(-ret, f"{os.strerror(-ret)} ({call})")


def buffer_address(buf: Any) -> int:
    """Address of a buffer-protocol object's memory (bytearray, mmap, ctypes array).

    For handing buffers to ``prep_read``/``prep_write``: the caller keeps
    ``buf`` alive, and unresized, until the request completes.
    """
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


class Ring:
    """One io_uring instance.

    ``sqe128``: 128-byte SQEs, which ublk control commands require.
    ``single_issuer``: the thread that creates the ring is the only one that
    submits to it; then COOP_TASKRUN | TASKRUN_FLAG | SINGLE_ISSUER are
    tried (less where the kernel lacks them).
    """

    def __init__(self, entries: int, *, sqe128: bool = False, single_issuer: bool = False):
        base = SETUP_SQE128 if sqe128 else 0
        extras = SINGLE_ISSUER_FALLBACKS if single_issuer else (0,)
        self._ring, self.setup_flags = self._setup(entries, base, extras)
        self._close = weakref.finalize(self, lib.ublkd_ring_free, self._ring)
        self._cmd_room = CMD_AREA_128 if sqe128 else CMD_AREA_64
        cq_entries = lib.ublkd_cq_entries(self._ring)
        self._reap_max = cq_entries
        self._reap_ud = ffi.new("uint64_t[]", cq_entries)
        self._reap_res = ffi.new("int32_t[]", cq_entries)

    @staticmethod
    def _setup(entries: int, base: int, extras: tuple[int, ...]) -> tuple[Any, int]:
        """io_uring_queue_init with the first flag set the kernel accepts."""
        err = ffi.new("int *")
        for extra in extras:
            ring = lib.ublkd_ring_new(entries, base | extra, err)
            if ring != ffi.NULL:
                return ring, base | extra
            if err[0] != -errno.EINVAL:
                break
        _raise(err[0], f"io_uring_queue_init(entries={entries}, flags={base | extra:#x})")
        raise AssertionError("unreachable")

    # --- life -------------------------------------------------------------

    def close(self) -> None:
        """Tear the ring down; the kernel cancels what is still in flight."""
        self._close()
        self._ring = ffi.NULL  # prep_* then fail in C instead of touching freed memory

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live(self) -> Any:
        if self.closed:
            raise ValueError("io_uring ring is closed")
        return self._ring

    def _fail(self, ret: int, call: str) -> None:
        """Raise for a failed prep_*: ValueError once closed, else OSError."""
        self._live()
        _raise(ret, call)

    def register_files(self, fds: list[int]) -> None:
        """io_uring_register_files: fds[i] becomes fixed file i (for QueueLoop);
        -1 leaves slot i empty, for update_files."""
        ret = lib.ublkd_register_files(self._live(), fds, len(fds))
        if ret < 0:
            _raise(ret, "io_uring_register_files")

    def update_files(self, offset: int, fds: list[int]) -> None:
        """Fixed files offset, offset + 1, ... become fds."""
        ret = lib.ublkd_update_files(self._live(), offset, fds, len(fds))
        if ret < 0:
            _raise(ret, "io_uring_register_files_update")

    def unregister_files(self) -> None:
        """Let go of every fixed file at once, not when the kernel gets round
        to tearing the closed ring down; nothing may be in flight."""
        ret = lib.ublkd_unregister_files(self._live())
        if ret < 0:
            _raise(ret, "io_uring_unregister_files")

    def register_sparse_buffers(self, count: int) -> None:
        """An empty table of `count` fixed buffers, for the kernel to fill."""
        ret = lib.ublkd_register_buffers_sparse(self._live(), count)
        if ret:
            self._fail(ret, "io_uring_register_buffers_sparse")

    def fileno(self) -> int:
        """The ring's own fd (e.g. to poll it or register an eventfd)."""
        return lib.ublkd_ring_fd(self._live())

    @property
    def sq_entries(self) -> int:
        return lib.ublkd_sq_entries(self._live())

    @property
    def cq_entries(self) -> int:
        return lib.ublkd_cq_entries(self._live())

    def sqe_space(self) -> int:
        """Free SQEs: how many prep_* calls fit before one submits by itself."""
        return lib.ublkd_sq_space(self._live())

    def cq_ready(self) -> int:
        """Completions waiting to be reaped."""
        return lib.ublkd_cq_ready(self._live())

    # --- preparing requests ------------------------------------------------

    def prep_nop(self, user_data: int) -> None:
        """A request that does nothing: completes with res 0."""
        ret = lib.ublkd_prep_nop(self._ring, user_data)
        if ret:
            self._fail(ret, "prep_nop")

    def prep_read(self, fd: int, addr: int, length: int, offset: int, user_data: int) -> None:
        """pread(fd) of length bytes at offset into the memory at addr."""
        ret = lib.ublkd_prep_read(self._ring, fd, addr, length, offset, user_data)
        if ret:
            self._fail(ret, "prep_read")

    def prep_write(self, fd: int, addr: int, length: int, offset: int, user_data: int) -> None:
        """pwrite(fd) of length bytes from the memory at addr, at offset."""
        ret = lib.ublkd_prep_write(self._ring, fd, addr, length, offset, user_data)
        if ret:
            self._fail(ret, "prep_write")

    def prep_fsync(self, fd: int, user_data: int, datasync: bool = True) -> None:
        """fdatasync(fd) (or fsync with datasync=False)."""
        flags = lib.IORING_FSYNC_DATASYNC if datasync else 0
        ret = lib.ublkd_prep_fsync(self._ring, fd, flags, user_data)
        if ret:
            self._fail(ret, "prep_fsync")

    def prep_fallocate(self, fd: int, mode: int, offset: int, length: int,
                       user_data: int) -> None:
        """fallocate(fd, mode, offset, length): punch holes, zero ranges."""
        ret = lib.ublkd_prep_fallocate(self._ring, fd, mode, offset, length, user_data)
        if ret:
            self._fail(ret, "prep_fallocate")

    def prep_uring_cmd(self, fd: int, cmd_op: int, payload: bytes, user_data: int) -> None:
        """IORING_OP_URING_CMD: payload goes to SQE byte 48 (16 bytes max, 80 with SQE128)."""
        if len(payload) > self._cmd_room:
            raise ValueError(
                f"uring_cmd payload of {len(payload)} bytes does not fit the "
                f"{self._cmd_room}-byte command area of this ring"
                + ("" if self._cmd_room == CMD_AREA_128 else " (use sqe128=True)")
            )
        ret = lib.ublkd_prep_uring_cmd(self._ring, fd, cmd_op, payload, len(payload), user_data)
        if ret:
            self._fail(ret, "prep_uring_cmd")

    # --- submitting and completing -----------------------------------------

    def submit(self) -> int:
        """Hand the queued SQEs to the kernel; returns how many it took."""
        while True:
            ret = lib.io_uring_submit(self._live())
            if ret >= 0:
                return ret
            if ret != -errno.EINTR:  # a signal: its handler has run, go on
                _raise(ret, "io_uring_submit")

    def submit_and_wait(self, wait_nr: int = 1) -> int:
        """Submit, then block (GIL released) until wait_nr completions are ready."""
        while True:
            ret = lib.io_uring_submit_and_wait(self._live(), wait_nr)
            if ret >= 0:
                return ret
            if ret != -errno.EINTR:
                _raise(ret, "io_uring_submit_and_wait")

    def reap(self, max: int | None = None) -> list[tuple[int, int]]:  # noqa: A002
        """(user_data, res) of every ready CQE (at most max), marked seen."""
        limit = self._reap_max if max is None else min(max, self._reap_max)
        n = lib.ublkd_reap(self._live(), self._reap_ud, self._reap_res, limit)
        if not n:
            return []
        return list(zip(ffi.unpack(self._reap_ud, n), ffi.unpack(self._reap_res, n), strict=True))

    def wait(self, min_complete: int = 1, timeout: float | None = None,
             max: int | None = None) -> list[tuple[int, int]]:  # noqa: A002
        """Submit, wait for min_complete completions (or timeout seconds), reap.

        On timeout returns what is ready, possibly nothing.
        """
        timeout_ns = -1 if timeout is None else int(timeout * 1e9)
        while True:
            ret = lib.ublkd_submit_and_wait_timeout(self._live(), min_complete, timeout_ns)
            if ret >= 0 or ret == -errno.ETIME:
                break
            if ret != -errno.EINTR:
                _raise(ret, "io_uring_submit_and_wait_timeout")
        return self.reap(max)

    def uring_cmd_sync(self, fd: int, cmd_op: int, payload: bytes) -> int:
        """Run one uring_cmd to completion and return its CQE res (negative errno on failure).

        For rings with nothing else in flight, like the control ring: ublk
        control commands run in the kernel's io-wq and may block there
        (START_DEV waits for the queues), so this waits with the GIL released.
        """
        self.prep_uring_cmd(fd, cmd_op, payload, SYNC_USER_DATA)
        while True:
            self.submit_and_wait(1)
            for user_data, res in self.reap():
                if user_data != SYNC_USER_DATA:
                    raise RuntimeError(
                        f"uring_cmd_sync: unexpected completion user_data={user_data:#x}: "
                        "the ring has other requests in flight"
                    )
                return res


BACKEND_IO = lib.UBLKD_BACKEND_IO  # user_data bit: a backend completion, not a ublk command
TAG_MASK = 0xFFFF


class QueueLoop:
    """The serving loop of one ublk queue, in C, on a Ring the caller owns.

    Per batch of completions, with the GIL released: decode each fetched
    request's descriptor, start it on the backend (or answer it: the null
    backend, inline file I/O), queue COMMIT_AND_FETCH for each finished one,
    submit the lot and wait again.  ``serve`` returns to Python only with
    *events*, ``(user_data, res)`` of what the loop does not handle itself:
    requests when no fast backend is set (or of an op it does not know),
    and ublk commands that did not return OK (ABORT, errors).  Python
    answers a request with ``commit`` or by queuing backend I/O on the ring
    with user_data ``tag | BACKEND_IO``, whose completion the loop commits.

    A loop is made before its device's /dev/ublkcN can be opened (in a
    recovery, before START_USER_RECOVERY: the ring, buffers and backend are
    then ready when the device's I/O starts waiting for us), and ``attach``
    gives it the device.  ``descriptors`` (the queue's mmap of /dev/ublkcN)
    and ``buffers`` (depth x buffer_size bytes) stay exported, so not
    closable, until ``close``.  The ring's fixed files are /dev/ublkcN (0)
    and the file backend's file (1).
    Without ``get_data_op`` tag t owns buffer t.  With it (the device has
    UBLK_F_NEED_GET_DATA; pass the NEED_GET_DATA opcode) buffers are lent
    from a pool per request, so only about as many as there are requests in
    flight are ever touched (resident).  With ``auto_buf_reg`` (the device
    has UBLK_F_AUTO_BUF_REG) no buffer is used: the kernel registers each
    request's pages in the ring's fixed-buffer slot of its tag, and only the
    file backend, with fixed reads and writes, serves reads and writes.
    With ``user_copy`` (UBLK_F_USER_COPY) no buffer is used either: the file
    backend, given the backing file's mapping, moves each request's data
    with one pread/pwrite on /dev/ublkcN.
    With ``poll_us`` the loop keeps looking for the next completion for that
    many microseconds after each one before it sleeps: lower latency at low
    queue depth for a CPU that spins while I/O flows (config key poll_us).
    """

    def __init__(self, ring: Ring, q_id: int, depth: int, buffers: Any, buffer_size: int,
                 commit_op: int, get_data_op: int | None = None, auto_buf_reg: bool = False,
                 user_copy: bool = False, poll_us: int = 0):
        self._closed = False
        self._ring = ring
        self.depth = depth
        self.user_copy = user_copy
        self._descs = None
        self._backing_map = None
        self._bufs = ffi.from_buffer(buffers, require_writable=True)
        if len(self._bufs) < depth * buffer_size:
            self.close()
            raise ValueError("QueueLoop: buffers smaller than depth needs")
        self.buffer_base = int(ffi.cast("uintptr_t", self._bufs))
        self._started = ffi.new("uint64_t[]", depth)
        events = 2 * depth  # a tag has at most one ublk command and one backend I/O queued
        self._ev_ud = ffi.new("uint64_t[]", events)
        self._ev_res = ffi.new("int32_t[]", events)
        q = self._q = ffi.new("struct ublkd_queue *")
        q.ring = ring._live()
        q.buf_base = self.buffer_base
        q.buf_size = buffer_size
        q.commit_op = commit_op
        q.char_fd, q.char_fixed = 0, 1
        q.backend_kind = lib.UBLKD_KIND_PYTHON
        q.backend_fd = q.backend_raw_fd = -1
        q.q_id = q_id
        q.depth = depth
        q.started = self._started
        q.ev_ud = self._ev_ud
        q.ev_res = self._ev_res
        q.ev_max = events
        q.pool = int(get_data_op is not None)
        q.get_data_op = get_data_op or 0
        q.auto_buf_reg = int(auto_buf_reg)
        q.user_copy = int(user_copy)
        q.char_raw_fd = -1
        q.poll_ns = poll_us * 1000
        self._slots = [ffi.new("int32_t[]", depth) for _ in range(3)]
        q.slot, q.free_slots, q.released = self._slots
        lib.ublkd_queue_init_slots(q)
        ring.register_files([-1, -1])  # filled by attach and use_file_backend
        if auto_buf_reg:
            ring.register_sparse_buffers(depth)

    def attach(self, char_fd: int, descriptors: Any) -> None:
        """Serve the device whose /dev/ublkcN is char_fd; descriptors: this
        queue's mmap of it."""
        descs = ffi.from_buffer(descriptors)
        if len(descs) < self.depth * 24:
            ffi.release(descs)
            raise ValueError("QueueLoop: descriptors smaller than depth needs")
        self._ring.update_files(0, [char_fd])
        self._q.char_raw_fd = char_fd
        self._descs = descs
        self._q.descs = ffi.cast("const uint8_t *", descs)

    def use_file_backend(self, fd: int, inline: bool = False, punch_hole: bool = True,
                         zero_range: bool = True, mapping: Any = None) -> None:
        """Serve READ/WRITE/FLUSH/DISCARD/WRITE_ZEROES on fd in C (a fixed
        file of the ring: no file lookup per SQE).

        ``inline``: pread/pwrite in the queue thread instead of io_uring,
        for memory-backed files (tmpfs), where io_uring would hand every
        request to an io-wq worker thread.
        ``punch_hole``/``zero_range``: the fallocate modes fd takes; without
        the first a DISCARD is answered at once, doing nothing (it is a
        hint), without the second a WRITE_ZEROES goes to Python.
        ``mapping``: a user-copy loop's shared, writable mmap of the file
        (exported until ``close``), which READ and WRITE copy from and to.
        """
        q = self._q
        if self.user_copy:
            if mapping is None:
                raise ValueError("QueueLoop: a user-copy loop needs the file's mapping")
            self._backing_map = ffi.from_buffer(mapping, require_writable=True)
            q.backend_map = ffi.cast("uint8_t *", self._backing_map)
            q.backend_map_len = len(self._backing_map)
        q.backend_kind = lib.UBLKD_KIND_FILE
        q.backend_raw_fd = fd
        q.backend_inline = int(inline)
        q.backend_punch_hole = int(punch_hole)
        q.backend_zero_range = int(zero_range)
        self._ring.update_files(1, [fd])
        q.backend_fd, q.backend_fixed = 1, 1

    def use_null_backend(self) -> None:
        """Reads return zeros, writes, flushes and discards succeed: all in C."""
        self._q.backend_kind = lib.UBLKD_KIND_NULL

    def serve(self, timeout: float, budget: float | None = None) -> list[tuple[int, int]]:
        """Serve until there are events, nothing happened for timeout seconds,
        or budget seconds (default: timeout) passed; returns the events."""
        if self._closed:
            raise ValueError("QueueLoop is closed")
        budget = timeout if budget is None else budget
        n = lib.ublkd_queue_serve(self._q, int(timeout * 1e9), int(budget * 1e9))
        if n < 0:
            _raise(n, "io_uring_submit_and_wait_timeout (queue loop)")
        if not n:
            return []
        return list(zip(ffi.unpack(self._ev_ud, n), ffi.unpack(self._ev_res, n), strict=True))

    def fetch(self, fetch_op: int, tag: int) -> None:
        """Queue FETCH_REQ of tag, naming its buffer (none in pool mode, the
        fixed-buffer slot with auto_buf_reg)."""
        ret = lib.ublkd_queue_fetch(self._q, fetch_op, tag)
        if ret:
            _raise(ret, "ublkd_queue_fetch")

    def buffer(self, tag: int) -> int:
        """Address of the buffer of the request tag holds (0 if it has none)."""
        return lib.ublkd_queue_buffer(self._q, tag)

    def commit(self, tag: int, result: int) -> None:
        """Queue COMMIT_AND_FETCH_REQ for tag with result (bytes done or -errno)."""
        ret = lib.ublkd_queue_commit(self._q, tag, result)
        if ret:
            _raise(ret, "ublkd_queue_commit")

    def oldest_started(self) -> float | None:
        """time.monotonic() at which the oldest request now in the server came in.

        None if there is none.  Safe to call from any thread, even after close.
        """
        if self._closed:
            return None
        oldest = lib.ublkd_queue_oldest(self._q)
        return oldest / 1e9 if oldest else None

    def backend_lost(self) -> tuple[float, int, bool] | None:
        """While an NBD queue has no connection: (time.monotonic() it went, requests
        waiting, whether they now fail with EIO); None while connected.  For
        STATUS, from any thread: a racy but harmless read."""
        q = self._q
        lost = q.nbd_lost_ns
        return (lost / 1e9, q.nbd_held, bool(q.nbd_failing)) if lost else None

    def fail_waiting_io(self) -> None:
        """Before STOP_DEV: requests waiting for a lost NBD server fail with EIO
        (the kernel's removal of the disk waits for every request).  Callable
        from any thread; the loop acts on it within 0.1 s."""
        self._q.nbd_stopping = 1

    def hand_over(self) -> None:
        """From now on leave new requests fetched and unanswered (the kernel
        re-issues them to the next server); ``serve`` returns as soon as
        nothing is left in flight.  Callable from any thread."""
        self._q.handover = 1

    @property
    def busy(self) -> int:
        """Requests now in the server: handed to the backend or to Python, not committed."""
        return self._q.busy

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests served in C, events handed to Python, ring waits
        (sleeps in io_uring_enter), completions found by polling instead."""
        q = self._q
        return {"served": q.nr_io, "events": q.nr_python, "waits": q.nr_waits,
                "get_data": q.nr_get_data, "polled": q.nr_polled}

    def use_nbd_backend(self, uri: str, name: str, reconnect_timeout: float) -> str | None:
        """Serve every request on this queue's own connection to the NBD server
        at `uri`, in C (ublkd_nbd.c); blocks while it connects.  A server that
        cannot be reached is not an error: requests wait for it (for up to
        `reconnect_timeout` seconds, 0: forever) while the loop reconnects;
        the return value then says why the first attempt failed."""
        error = ffi.new("char[]", 512)
        error_number = ffi.new("int *")
        ret = lib.ublkd_nbd_attach(self._q, uri.encode(), name.encode(),
                                   int(reconnect_timeout * 1e9), error_number, error,
                                   len(error))
        if ret < 0:
            raise OSError(error_number[0], ffi.string(error).decode(errors="replace"))
        return ffi.string(error).decode(errors="replace") if ret > 0 else None

    def use_rbd_backend(self, image: object) -> None:
        """Serve every request through librbd on `image` (ublkd_rbd.c), which
        the backend has opened and locked; it must outlive this loop."""
        ret = lib.ublkd_rbd_attach(self._q, image)
        if ret < 0:
            raise OSError(-ret, f"cannot serve the rbd image: {os.strerror(-ret)}")

    def close(self) -> None:
        """Release the buffers (they can be closed after this); the ring stays the caller's."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "_q"):
            lib.ublkd_nbd_detach(self._q)
            lib.ublkd_rbd_detach(self._q)
            self._q.ring = ffi.NULL
        if self._descs is not None:
            ffi.release(self._descs)
        if self._backing_map is not None:
            ffi.release(self._backing_map)
        ffi.release(self._bufs)

    def __enter__(self) -> QueueLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
