"""uring.QueueLoop, the C serving loop of a ublk queue, on the host's io_uring.

No ublk here: a NOP with user_data = tag stands for the kernel handing us a
request (a ublk command completing with UBLK_IO_RES_OK), the descriptors
are a bytearray, and /dev/ublkcN is a regular file, on which the loop's
COMMIT_AND_FETCH completes with -EOPNOTSUPP: an event, which shows that the
request was answered.  Data paths are checked through the backing file and
the tag buffers.
"""

from __future__ import annotations

import mmap
import os
import threading
import time

import pytest

from tests.unit.queue_harness import (BUFFER, COMMIT_OP, DEPTH, DESCRIPTOR, NOT_A_UBLK_DEVICE,
                                     Harness)
from ublkd.kernel import uapi
from ublkd.kernel.uring import BACKEND_IO, QueueLoop, Ring, buffer_address

@pytest.mark.parametrize("inline", [False, True])
def test_file_reads_and_writes_are_served_and_committed_in_c(harness, files, inline):
    _, backing = files
    harness.loop.use_file_backend(backing, inline=inline)
    harness.request(2, uapi.UBLK_IO_OP_READ, sector=1, sectors=8)
    assert harness.events(1) == [(2, NOT_A_UBLK_DEVICE)]
    assert harness.buffer(2, 4096) == os.pread(backing, 4096, 512)

    harness.buffers[BUFFER: BUFFER + 1024] = b"\xab" * 1024
    harness.request(1, uapi.UBLK_IO_OP_WRITE, sector=100, sectors=2)
    assert harness.events(1) == [(1, NOT_A_UBLK_DEVICE)]
    assert os.pread(backing, 1024, 100 * 512) == b"\xab" * 1024
    assert harness.loop.stats["served"] == 2
    assert harness.loop.oldest_started() is None  # both answered


def test_a_batch_of_requests_in_one_call(harness, files):
    _, backing = files
    harness.loop.use_file_backend(backing)
    for tag in range(DEPTH):
        harness.request(tag, uapi.UBLK_IO_OP_READ, sector=tag * 8, sectors=8)
    assert harness.events(DEPTH) == [(tag, NOT_A_UBLK_DEVICE) for tag in range(DEPTH)]
    for tag in range(DEPTH):
        assert harness.buffer(tag, 4096) == os.pread(backing, 4096, tag * 4096)


def test_flush_discard_and_write_zeroes_reach_the_file(harness, files):
    _, backing = files
    harness.loop.use_file_backend(backing)
    harness.request(0, uapi.UBLK_IO_OP_FLUSH, 0, 0)
    harness.request(1, uapi.UBLK_IO_OP_DISCARD, sector=8, sectors=8)
    harness.request(2, uapi.UBLK_IO_OP_WRITE_ZEROES, sector=32, sectors=8)
    assert harness.events(3) == [(t, NOT_A_UBLK_DEVICE) for t in range(3)]
    assert os.pread(backing, 4096, 4096) == bytes(4096)
    assert os.pread(backing, 4096, 32 * 512) == bytes(4096)
    assert os.fstat(backing).st_size == 256 * 1024  # KEEP_SIZE


def test_a_short_read_at_the_end_of_the_file_commits_what_was_read(harness, files):
    _, backing = files
    harness.loop.use_file_backend(backing, inline=True)
    harness.buffers[0:4096] = b"\xff" * 4096
    harness.request(0, uapi.UBLK_IO_OP_READ, sector=(256 * 1024 - 512) // 512, sectors=8)
    assert harness.events(1) == [(0, NOT_A_UBLK_DEVICE)]
    assert harness.buffer(0, 512) == os.pread(backing, 512, 256 * 1024 - 512)


def test_ops_the_loop_does_not_know_go_to_python(harness, files):
    _, backing = files
    harness.loop.use_file_backend(backing)
    harness.request(3, uapi.UBLK_IO_OP_ZONE_OPEN, 0, 8)
    assert harness.events(1) == [(3, uapi.UBLK_IO_RES_OK)]
    assert harness.loop.stats["events"] == 1


def test_null_backend_answers_in_c(harness):
    harness.loop.use_null_backend()
    harness.buffers[0:BUFFER] = b"\x55" * BUFFER  # an earlier write's data
    harness.request(0, uapi.UBLK_IO_OP_READ, 0, 16)
    harness.request(1, uapi.UBLK_IO_OP_WRITE, 0, 16)
    harness.request(2, uapi.UBLK_IO_OP_FLUSH, 0, 0)
    assert harness.events(3) == [(t, NOT_A_UBLK_DEVICE) for t in range(3)]
    assert harness.buffer(0, 8192) == bytes(8192)
    assert harness.buffer(0, 8192 + 1)[-1] == 0x55  # only the request's bytes


def test_python_backend_sees_each_request_and_its_io_is_committed(harness, files):
    _, backing = files
    harness.request(1, uapi.UBLK_IO_OP_READ, 0, 8)
    before = time.monotonic()
    assert harness.events(1) == [(1, uapi.UBLK_IO_RES_OK)]
    started = harness.loop.oldest_started()
    assert started is not None and before - 1 <= started <= time.monotonic()

    # Python queues the backend I/O itself; the loop commits its completion.
    address = harness.loop.buffer_base + BUFFER
    harness.ring.prep_read(backing, address, 4096, 8192, 1 | BACKEND_IO)
    assert harness.events(1) == [(1, NOT_A_UBLK_DEVICE)]
    assert harness.buffer(1, 4096) == os.pread(backing, 4096, 8192)
    assert harness.loop.oldest_started() is None

    # ... or answers at once.
    harness.request(2, uapi.UBLK_IO_OP_FLUSH, 0, 0)
    assert harness.events(1) == [(2, uapi.UBLK_IO_RES_OK)]
    harness.loop.commit(2, 0)
    assert harness.events(1) == [(2, NOT_A_UBLK_DEVICE)]


def test_serve_returns_when_idle(harness):
    start = time.monotonic()
    assert harness.loop.serve(0.05) == []
    assert time.monotonic() - start < 2


@pytest.fixture
def polling(harnesses):
    """A loop that polls for 3 s after each completion: far longer than any
    step of these tests, so a sleep can only mean the polling missed one."""
    h = harnesses(poll_us=3_000_000)
    h.loop.use_null_backend()
    return h


@pytest.mark.parametrize("poll_us", [0, 3_000_000])
def test_a_polling_loop_finds_the_next_request_without_sleeping(harnesses, poll_us):
    h = harnesses(poll_us=poll_us)
    h.loop.use_null_backend()
    h.request(0, uapi.UBLK_IO_OP_READ, 0, 8)
    assert h.events(1) == [(0, NOT_A_UBLK_DEVICE)]
    waits = h.loop.stats["waits"]
    h.request(1, uapi.UBLK_IO_OP_WRITE, 0, 8)
    assert h.events(1) == [(1, NOT_A_UBLK_DEVICE)]
    slept = h.loop.stats["waits"] - waits
    assert (slept == 0) if poll_us else (slept >= 1)


def test_polling_sees_completions_the_kernel_posts_from_task_work(polling):
    """A pipe read completes by task work, which runs only when this thread
    enters the kernel (COOP_TASKRUN): the polling must get it posted without
    falling asleep.  (The TASKRUN flag makes that prompt; a timer tick would
    also do it, in milliseconds, so this does not tell the two apart.)"""
    polling.ring.prep_nop(DEPTH)  # any completion starts the polling
    assert polling.events(1) == [(DEPTH, 0)]
    read_end, write_end = os.pipe()
    byte = bytearray(1)
    try:
        polling.ring.prep_read(read_end, buffer_address(byte), 1, 0, DEPTH + 1)
        writer = threading.Timer(0.2, os.write, (write_end, b"x"))
        writer.start()
        before = polling.loop.stats
        assert polling.events(1) == [(DEPTH + 1, 1)]
        writer.join()
        assert byte == b"x"
        assert polling.loop.stats["waits"] == before["waits"]
        assert polling.loop.stats["polled"] == before["polled"] + 1
    finally:
        os.close(read_end)
        os.close(write_end)


def test_with_two_requests_in_the_server_the_loop_sleeps_instead_of_polling(harnesses):
    """Polling pays for one request alone; with more in flight the CPU is
    left to the server."""
    h = harnesses(poll_us=3_000_000)
    h.request(0, uapi.UBLK_IO_OP_READ, 0, 8)
    h.request(1, uapi.UBLK_IO_OP_READ, 8, 8)
    assert h.events(2) == [(0, uapi.UBLK_IO_RES_OK), (1, uapi.UBLK_IO_RES_OK)]
    assert h.loop.busy == 2  # both with Python, the backend here
    cpu = time.thread_time()
    assert h.loop.serve(0.5) == []
    assert time.thread_time() - cpu < 0.25  # asleep, not polling for the 0.5 s


def test_a_polling_loop_sleeps_once_nothing_comes(harnesses):
    """The idle policy: polling ends poll_us after the last completion, and
    an idle device then costs no CPU."""
    h = harnesses(poll_us=100_000)
    h.loop.use_null_backend()
    h.request(0, uapi.UBLK_IO_OP_READ, 0, 8)
    assert h.events(1) == [(0, NOT_A_UBLK_DEVICE)]
    waits = h.loop.stats["waits"]
    cpu = time.thread_time()
    assert h.loop.serve(1.0) == []
    assert h.loop.stats["waits"] == waits + 1
    assert time.thread_time() - cpu < 0.6  # about 0.1 s of polling, then asleep


def test_a_request_larger_than_its_buffer_fails_without_touching_memory(harness, files):
    _, backing = files
    harness.loop.use_file_backend(backing)
    harness.request(3, uapi.UBLK_IO_OP_READ, 0, BUFFER // 512 + 8)
    # Committed with -EINVAL; the fake char device answers the commit.
    assert harness.events(1) == [(3, NOT_A_UBLK_DEVICE)]


def test_closed_loop_refuses_to_serve(files):
    h = Harness(files[0])
    h.loop.close()
    h.loop.close()
    assert h.loop.oldest_started() is None
    with pytest.raises(ValueError, match="closed"):
        h.loop.serve(0.01)
    h.ring.close()
    h.buffers.close()


def test_buffers_must_cover_depth():
    with Ring(4) as ring, pytest.raises(ValueError, match="buffers smaller"):
        QueueLoop(ring, 0, DEPTH, bytearray(BUFFER), BUFFER, COMMIT_OP)


def test_descriptors_must_cover_depth(files):
    with Ring(4) as ring:
        loop = QueueLoop(ring, 0, DEPTH, bytearray(DEPTH * BUFFER), BUFFER, COMMIT_OP)
        with pytest.raises(ValueError, match="descriptors smaller"):
            loop.attach(files[0], bytearray(DEPTH * 24 - 1))
        loop.close()


def test_buffer_address_matches_the_loop_base(harness):
    assert harness.loop.buffer_base == buffer_address(harness.buffers)


def test_hand_over_leaves_new_requests_fetched_and_returns_when_idle(harness, files):
    _, backing = files
    harness.request(1, uapi.UBLK_IO_OP_READ, 0, 8)  # Python backend: stays in the server
    assert harness.events(1) == [(1, uapi.UBLK_IO_RES_OK)]
    assert harness.loop.busy == 1
    harness.loop.hand_over()
    harness.request(2, uapi.UBLK_IO_OP_READ, 0, 8)
    assert harness.loop.serve(0.2) == []  # tag 2 left fetched, tag 1 still busy
    assert harness.loop.busy == 1
    harness.loop.commit(1, 4096)
    assert harness.loop.busy == 0
    start = time.monotonic()
    assert harness.loop.serve(30) == []  # nothing in flight: back at once ...
    assert time.monotonic() - start < 5
    assert harness.ring.wait(1, timeout=5) == [(1, NOT_A_UBLK_DEVICE)]  # ... commit submitted


# --- pool mode: the device has UBLK_F_NEED_GET_DATA ---------------------------
GET_DATA_OP = 0xC0107522


@pytest.fixture
def pooled(harnesses):
    return harnesses(get_data_op=GET_DATA_OP)


def kernel_asks_for_data(h: Harness, tag: int, sectors: int, data_fd: int) -> None:
    """A WRITE arrives as NEED_GET_DATA (CQE res 1): a 1-byte read gives that res."""
    DESCRIPTOR.pack_into(h.descriptors, tag * 24, uapi.UBLK_IO_OP_WRITE, sectors, 64, 0)
    h.ring.prep_read(data_fd, buffer_address(h.scratch), 1, 0, tag)


def test_pool_fetches_name_no_buffer_and_reads_share_one(pooled, files):
    _, backing = files
    pooled.loop.use_file_backend(backing)
    assert pooled.loop.buffer(5 % DEPTH) == 0  # what its FETCH names: none
    for tag in (0, 3):
        pooled.request(tag, uapi.UBLK_IO_OP_READ, sector=tag * 8, sectors=8)
        assert pooled.events(1) == [(tag, NOT_A_UBLK_DEVICE)]
        # Both landed in buffer 0: taken from the pool, given back after the commit.
        assert pooled.buffer(0, 4096) == os.pread(backing, 4096, tag * 4096)
    assert pooled.loop.buffer(3) == 0  # committed: the tag holds no buffer


def test_pool_write_names_its_buffer_with_need_get_data(pooled, files):
    _, backing = files
    pooled.loop.use_file_backend(backing)
    kernel_asks_for_data(pooled, 2, sectors=8, data_fd=backing)
    # The fake /dev/ublkcN refuses the NEED_GET_DATA command: an event.
    assert pooled.events(1) == [(2, NOT_A_UBLK_DEVICE)]
    assert pooled.loop.stats["get_data"] == 1
    address = pooled.loop.buffer(2)
    assert address == pooled.loop.buffer_base  # buffer 0, top of the pool
    pooled.buffers[0:4096] = b"\x5a" * 4096  # what the kernel would copy in
    pooled.ring.prep_nop(2)  # ... and then the request comes back OK
    assert pooled.events(1) == [(2, NOT_A_UBLK_DEVICE)]
    assert os.pread(backing, 4096, 64 * 512) == b"\x5a" * 4096
    assert pooled.loop.buffer(2) == 0


def test_pool_write_without_need_get_data_is_refused(pooled, files):
    _, backing = files
    pooled.loop.use_file_backend(backing)
    before = os.pread(backing, 4096, 0)
    pooled.request(1, uapi.UBLK_IO_OP_WRITE, sector=0, sectors=8)
    assert pooled.events(1) == [(1, NOT_A_UBLK_DEVICE)]
    assert os.pread(backing, 4096, 0) == before


def test_pool_python_backend_gets_the_lent_buffer(pooled, files):
    _, backing = files
    pooled.request(1, uapi.UBLK_IO_OP_READ, 0, 8)
    assert pooled.events(1) == [(1, uapi.UBLK_IO_RES_OK)]
    assert pooled.loop.buffer(1) == pooled.loop.buffer_base
    pooled.request(2, uapi.UBLK_IO_OP_FLUSH, 0, 0)
    assert pooled.events(1) == [(2, uapi.UBLK_IO_RES_OK)]
    assert pooled.loop.buffer(2) == 0  # no data, no buffer
    pooled.loop.commit(1, 4096)
    pooled.loop.commit(2, 0)
    assert pooled.events(2) == [(1, NOT_A_UBLK_DEVICE), (2, NOT_A_UBLK_DEVICE)]


def user_copy_position(tag: int) -> int:
    """Where /dev/ublkcN holds the data of queue 0's tag (ublk_cmd.h's layout)."""
    return uapi.UBLKSRV_IO_BUF_OFFSET + (tag << 25)


def test_user_copy_moves_data_between_the_mapped_file_and_the_char_device(files):
    """UBLK_F_USER_COPY: a READ is the file's bytes written to /dev/ublkcN at
    the tag's position, a WRITE the bytes there read into the file, through
    the file's mapping; no buffer of ours is named."""
    char, backing = files
    harness = Harness(char, user_copy=True)
    mapping = mmap.mmap(backing, 256 * 1024)
    try:
        harness.loop.use_file_backend(backing, inline=True, mapping=mapping)
        assert harness.loop.buffer(1) == 0
        harness.request(1, uapi.UBLK_IO_OP_READ, sector=3, sectors=8)
        assert harness.events(1) == [(1, NOT_A_UBLK_DEVICE)]
        assert os.pread(char, 4096, user_copy_position(1)) == os.pread(backing, 4096, 3 * 512)

        os.pwrite(char, b"\xcd" * 2048, user_copy_position(2))
        harness.request(2, uapi.UBLK_IO_OP_WRITE, sector=40, sectors=4)
        assert harness.events(1) == [(2, NOT_A_UBLK_DEVICE)]
        assert os.pread(backing, 2048, 40 * 512) == b"\xcd" * 2048
        assert harness.loop.stats["served"] == 2
    finally:
        harness.close()
        mapping.close()  # closable: the loop released it


def test_a_user_copy_loop_needs_the_mapping(harnesses, files):
    harness = harnesses(user_copy=True)
    with pytest.raises(ValueError, match="mapping"):
        harness.loop.use_file_backend(files[1], inline=True)
