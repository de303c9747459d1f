"""The io_uring binding on the host's real io_uring (no ublk needed)."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from ublkd.kernel import uring
from ublkd.kernel.uring import Ring, buffer_address

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096


@pytest.fixture
def ring():
    with Ring(16) as r:
        yield r


@pytest.fixture
def temp_fd(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def complete_all(ring: Ring, count: int) -> dict[int, int]:
    """Submit and collect count completions as {user_data: res}."""
    done: dict[int, int] = {}
    while len(done) < count:
        for user_data, res in ring.wait(1):
            assert user_data not in done, f"user_data {user_data} completed twice"
            done[user_data] = res
    return done


def test_nop_round_trip(ring):
    ring.prep_nop(0xDEADBEEF_CAFEF00D)
    assert ring.submit_and_wait(1) == 1
    assert ring.reap() == [(0xDEADBEEF_CAFEF00D, 0)]
    assert ring.reap() == []


def test_write_read_fsync_and_punch_hole(ring, temp_fd):
    payload = bytearray(os.urandom(4 * BLOCK))
    ring.prep_write(temp_fd, buffer_address(payload), len(payload), 0, 1)
    assert complete_all(ring, 1) == {1: len(payload)}
    ring.prep_fsync(temp_fd, 2)
    ring.prep_fsync(temp_fd, 3, datasync=False)
    assert complete_all(ring, 2) == {2: 0, 3: 0}
    assert os.pread(temp_fd, len(payload), 0) == payload

    back = bytearray(len(payload))
    ring.prep_read(temp_fd, buffer_address(back), len(back), 0, 4)
    assert complete_all(ring, 1) == {4: len(back)}
    assert back == payload

    ring.prep_fallocate(temp_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BLOCK, 2 * BLOCK, 5)
    assert complete_all(ring, 1) == {5: 0}
    assert os.fstat(temp_fd).st_size == len(payload)
    expected = payload[:BLOCK] + bytes(2 * BLOCK) + payload[3 * BLOCK:]
    ring.prep_read(temp_fd, buffer_address(back), len(back), 0, 6)
    assert complete_all(ring, 1) == {6: len(back)}
    assert back == expected


def test_read_at_an_offset_into_part_of_a_buffer(ring, temp_fd):
    os.pwrite(temp_fd, b"0123456789", 0)
    buf = bytearray(8)
    ring.prep_read(temp_fd, buffer_address(buf) + 2, 4, 3, 7)
    assert complete_all(ring, 1) == {7: 4}
    assert buf == b"\0\x003456\0\0"


def test_many_requests_batched_past_the_ring_size(ring):
    count = 1000  # the SQ holds 16: prep_* submits by itself when it is full
    for i in range(count):
        ring.prep_nop(i)
    done = complete_all(ring, count)
    assert sorted(done) == list(range(count))
    assert set(done.values()) == {0}


def test_reap_respects_max(ring):
    for i in range(5):
        ring.prep_nop(i)
    ring.submit_and_wait(5)
    assert ring.cq_ready() == 5
    assert ring.reap(max=2) == [(0, 0), (1, 0)]
    assert ring.reap() == [(2, 0), (3, 0), (4, 0)]


def test_wait_with_timeout_returns_what_is_ready(ring):
    assert ring.wait(1, timeout=0.05) == []
    ring.prep_nop(9)
    assert ring.wait(1, timeout=5) == [(9, 0)]


def test_sqe_space_counts_down_and_submit_frees(ring):
    assert ring.sqe_space() == ring.sq_entries == 16
    ring.prep_nop(1)
    ring.prep_nop(2)
    assert ring.sqe_space() == 14
    assert ring.submit() == 2
    assert ring.sqe_space() == 16
    complete_all(ring, 2)


def test_failed_request_reports_negative_errno_in_res(ring, tmp_path):
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        buf = bytearray(16)
        ring.prep_write(fd, buffer_address(buf), len(buf), 0, 1)
        assert complete_all(ring, 1) == {1: -errno.EBADF}
    finally:
        os.close(fd)


def test_ring_setup_errors_are_oserror_naming_the_call():
    with pytest.raises(OSError) as failure:
        Ring(0)
    assert failure.value.errno == errno.EINVAL
    assert "io_uring_queue_init" in str(failure.value)


def test_closed_ring_refuses_work():
    r = Ring(4)
    r.close()
    r.close()  # twice is fine
    assert r.closed
    with pytest.raises(ValueError, match="closed"):
        r.submit()
    with pytest.raises(ValueError, match="closed"):
        r.prep_uring_cmd(0, 0, bytes(16), 0)  # C sees NULL, not freed memory


def test_uring_cmd_payload_must_fit_the_sqe(ring, temp_fd):
    with pytest.raises(ValueError, match="sqe128"):
        ring.prep_uring_cmd(temp_fd, 0, bytes(17), 1)
    with Ring(4, sqe128=True) as big:
        assert big.setup_flags & uring.SETUP_SQE128
        with pytest.raises(ValueError):
            big.prep_uring_cmd(temp_fd, 0, bytes(81), 1)


def test_uring_cmd_sync_returns_the_kernels_answer(temp_fd):
    # Regular files have no uring_cmd handler: the CQE carries -EOPNOTSUPP.
    with Ring(4, sqe128=True) as big:
        assert big.uring_cmd_sync(temp_fd, 0x1234, bytes(80)) == -errno.EOPNOTSUPP
    with Ring(4) as small:
        small.prep_uring_cmd(temp_fd, 0xC0107520, bytes(16), 77)
        assert complete_all(small, 1) == {77: -errno.EOPNOTSUPP}


def test_single_issuer_ring_works_from_its_thread():
    result: list = []

    def run() -> None:
        with Ring(8, single_issuer=True) as r:
            assert r.setup_flags in uring.SINGLE_ISSUER_FALLBACKS
            for i in range(20):
                r.prep_nop(i)
            result.append(sorted(complete_all(r, 20)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert result == [list(range(20))]


def test_fileno_is_the_ring_fd(ring):
    assert os.readlink(f"/proc/self/fd/{ring.fileno()}") == "anon_inode:[io_uring]"


def test_build_without_liburing_headers_says_what_to_install(monkeypatch):
    from ublkd.kernel import _uring_build

    monkeypatch.setattr(_uring_build, "INCLUDE_DIRS", ())
    monkeypatch.delenv("CPATH", raising=False)
    monkeypatch.delenv("C_INCLUDE_PATH", raising=False)
    with pytest.raises(SystemExit) as failure:
        _uring_build.make_ffibuilder()
    assert "apt-get install liburing-dev" in str(failure.value.code)
