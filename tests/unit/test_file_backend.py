"""The file backend's choices that need no ublk driver: which files it takes,
which fallocate modes it finds, what it serves without them, what the device
advertises from that.

The file systems are the host's: /dev/shm is tmpfs (PUNCH_HOLE, no
ZERO_RANGE: the case of issue 10); pytest's tmp_path is wherever it is.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.unit.queue_harness import NOT_A_UBLK_DEVICE
from ublkd.backends import Request
from ublkd.backends.file import (TMPFS_MAGIC, FallocateModes, FileBackend,
                                 block_device_writes_zeroes, filesystem_type, probe_fallocate)
from ublkd.backends.null import NullBackend
from ublkd.config import parse_config
from ublkd.daemon import Device
from ublkd.errors import BackendError, ConfigError
from ublkd.kernel import uapi
from ublkd.kernel.control import DeviceInfo
from ublkd.kernel.uring import Ring

MiB = 1024 * 1024


def config_for(path: Path, extra: str = "", name: str = "vol0"):
    return parse_config(name, f'backend = "file"\npath = "{path}"\n{extra}',
                        Path(f"/etc/ublkd/{name}.toml"))


def filesystem_kind(directory: Path) -> int | None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        return filesystem_type(fd)
    finally:
        os.close(fd)


@pytest.fixture
def shm_dir():
    """A directory on tmpfs, which cannot zero a range."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_kind(shm) != TMPFS_MAGIC:
        pytest.skip("no tmpfs at /dev/shm")
    directory = shm / f"ublkd-test-{os.getpid()}"
    directory.mkdir()
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


# --- what `path` may name ---------------------------------------------------------
def test_a_directory_is_a_config_error_that_suggests_a_file_in_it(tmp_path):
    with pytest.raises(ConfigError) as caught:
        FileBackend(config_for(tmp_path, 'size = "1MiB"\n'))
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "/etc/ublkd/vol0.toml" in message and f'"{tmp_path}"' in message
    assert "is a directory" in message and f"{tmp_path}/vol0.img" in message


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Opening a FIFO for reading would block until a writer comes: this returns.
    with pytest.raises(ConfigError, match="is a FIFO"):
        FileBackend(config_for(fifo, 'size = "1MiB"\n'))


def test_a_socket_and_a_character_device_are_refused(tmp_path):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "sock"))
        with pytest.raises(ConfigError, match="is a socket"):
            FileBackend(config_for(tmp_path / "sock"))
    with pytest.raises(ConfigError, match="/dev/null.* is a character device"):
        FileBackend(config_for(Path("/dev/null")))


def test_a_missing_directory_stays_a_backend_error_that_is_retried(tmp_path):
    with pytest.raises(BackendError) as caught:
        FileBackend(config_for(tmp_path / "not-mounted" / "vol0.img", 'size = "1MiB"\n'))
    assert caught.value.exit_code == 6 and "not mounted yet" in str(caught.value)


# --- probing fallocate --------------------------------------------------------------
def test_tmpfs_punches_holes_but_cannot_zero_a_range(shm_dir):
    image = shm_dir / "vol0.img"
    image.write_bytes(b"\xaa" * MiB)
    fd = os.open(image, os.O_RDWR)
    try:
        assert probe_fallocate(fd, image) == FallocateModes(punch_hole=True, zero_range=False)
    finally:
        os.close(fd)
    assert image.read_bytes() == b"\xaa" * MiB  # the data is never probed
    assert [child.name for child in shm_dir.iterdir()] == ["vol0.img"]  # nothing left


def test_a_directory_without_room_for_a_probe_assumes_nothing(tmp_path):
    image = tmp_path / "vol0.img"
    image.write_bytes(bytes(4096))
    fd = os.open(image, os.O_RDWR)
    try:
        assert probe_fallocate(fd, tmp_path / "gone" / "vol0.img") == \
            FallocateModes(punch_hole=False, zero_range=False)
    finally:
        os.close(fd)


def test_an_unknown_block_device_has_no_write_zeroes():
    assert block_device_writes_zeroes(os.makedev(4095, 1048575)) is False


def test_the_backend_advertises_what_its_file_system_does(shm_dir):
    backend = FileBackend(config_for(shm_dir / "vol0.img", 'size = "1MiB"\n'))
    try:
        assert (backend.supports_discard, backend.supports_write_zeroes) == (True, False)
        fast = backend.fast_path()
        assert (fast.punch_hole, fast.zero_range) == (True, False)
    finally:
        backend.close()


# --- serving without a mode (a recovered device that advertised it) -----------------
@pytest.fixture
def backend_without_fallocate(tmp_path):
    """An O_DIRECT backend (where the host's tmp_path allows) whose modes both fail."""
    image = tmp_path / "vol0.img"
    image.write_bytes(b"\x77" * (4 * MiB))
    backend = FileBackend(config_for(image))
    backend.modes = FallocateModes(punch_hole=False, zero_range=False)
    yield backend, image
    backend.close()


def read(image: Path, length: int, offset: int) -> bytes:
    with image.open("rb") as file:
        file.seek(offset)
        return file.read(length)


def test_write_zeroes_without_zero_range_writes_zeros(backend_without_fallocate):
    backend, image = backend_without_fallocate
    with Ring(4) as ring:
        length = 3 * MiB - 4096  # more than one chunk, and not a multiple of it
        result = backend.submit(ring, Request(uapi.UBLK_IO_OP_WRITE_ZEROES, 4096, length, 0), 0)
    assert result == 0
    assert read(image, length, 4096) == bytes(length)
    assert read(image, 4096, 0) == b"\x77" * 4096
    assert read(image, 4096, 3 * MiB) == b"\x77" * 4096
    assert image.stat().st_size == 4 * MiB


def test_discard_without_punch_hole_does_nothing(backend_without_fallocate):
    backend, image = backend_without_fallocate
    with Ring(4) as ring:
        assert backend.submit(ring, Request(uapi.UBLK_IO_OP_DISCARD, 0, MiB, 0), 0) == 0
    assert read(image, MiB, 0) == b"\x77" * MiB


def test_c_loop_answers_discard_without_punch_hole_and_hands_write_zeroes_on(harness, files):
    _, backing = files
    before = os.pread(backing, 8192, 0)
    harness.loop.use_file_backend(backing, punch_hole=False, zero_range=False)
    harness.request(1, uapi.UBLK_IO_OP_DISCARD, sector=0, sectors=8)
    harness.request(2, uapi.UBLK_IO_OP_WRITE_ZEROES, sector=8, sectors=8)
    # DISCARD: committed at once (the fake char device refuses the commit);
    # WRITE_ZEROES: an event for Python's FileBackend.submit.
    assert harness.events(2) == [(1, NOT_A_UBLK_DEVICE), (2, uapi.UBLK_IO_RES_OK)]
    assert os.pread(backing, 8192, 0) == before


# --- what the device advertises -------------------------------------------------------
def params_of(backend, tmp_path) -> dict[str, int]:
    device = Device(config_for(tmp_path / "vol0.img", 'size = "1MiB"\n'), None, None)
    device.info = DeviceInfo(dev_id=0, nr_queues=1, queue_depth=128, state=0,
                             max_io_buf_bytes=512 * 1024, pid=0, flags=0)
    params = device.params_for(backend)
    return {key: getattr(params, key) for key in ("discard_granularity", "max_discard_sectors",
                                                  "max_write_zeroes_sectors",
                                                  "max_discard_segments")}


def test_params_carry_discard_and_write_zeroes_only_when_served(shm_dir, tmp_path):
    backend = FileBackend(config_for(shm_dir / "vol0.img", 'size = "1MiB"\n'))
    try:
        assert params_of(backend, tmp_path) == {
            "discard_granularity": 4096, "max_discard_sectors": 1 << 21,
            "max_write_zeroes_sectors": 0, "max_discard_segments": 1}
        backend.supports_discard = False
        assert params_of(backend, tmp_path) == dict.fromkeys(
            ("discard_granularity", "max_discard_sectors", "max_write_zeroes_sectors",
             "max_discard_segments"), 0)
        backend.supports_write_zeroes = True  # only write-zeroes: still a granularity
        assert params_of(backend, tmp_path) == {
            "discard_granularity": 4096, "max_discard_sectors": 0,
            "max_write_zeroes_sectors": 1 << 21, "max_discard_segments": 0}
    finally:
        backend.close()


def test_null_backend_advertises_both(tmp_path):
    null = NullBackend(parse_config("n", 'backend = "null"\nsize = "1MiB"\n', Path("n.toml")))
    assert params_of(null, tmp_path)["max_write_zeroes_sectors"] == 1 << 21



def test_a_dangling_symlink_as_path_is_not_followed_to_create_a_file(tmp_path):
    link = tmp_path / "vol0.img"
    link.symlink_to(tmp_path / "not-mounted" / "vol0.img")
    config = parse_config("vol0", f'backend = "file"\npath = "{link}"\nsize = "1MiB"\n',
                          tmp_path / "vol0.toml")
    with pytest.raises(BackendError, match="is a symbolic link to .*which does not exist"):
        FileBackend(config)
    assert not (tmp_path / "not-mounted").exists()
