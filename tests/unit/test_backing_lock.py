"""The backing file's lock: a second server is refused, a recovering one waits
for the dead server's lock to go (the kernel drops it with the rings)."""

import fcntl
import os
import threading
from pathlib import Path

import pytest

from ublkd.backends import open_backend
from ublkd.backends.file import lock_exclusively
from ublkd.config import parse_config
from ublkd.errors import DeviceBusyError


@pytest.fixture
def locked(tmp_path: Path):
    """(config, a fresh fd of the backing file, the fd that holds its lock)."""
    image = tmp_path / "vol0.img"
    image.write_bytes(bytes(4096))
    config = parse_config("vol0", f'backend = "file"\npath = "{image}"\n',
                          tmp_path / "vol0.toml")
    holder = os.open(image, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    fd = os.open(image, os.O_RDWR)
    yield config, fd, holder
    os.close(fd)
    os.close(holder)


def test_a_held_lock_refuses_a_new_server_at_once(locked):
    config, fd, _ = locked
    with pytest.raises(DeviceBusyError, match="is locked by another process"):
        lock_exclusively(fd, config, wait=0.0)


def test_a_recovering_server_waits_for_the_lock_to_go(locked):
    config, fd, holder = locked
    threading.Timer(0.2, fcntl.flock, (holder, fcntl.LOCK_UN)).start()
    lock_exclusively(fd, config, wait=10.0)
    with pytest.raises(BlockingIOError):
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_wait_is_bounded(locked):
    config, fd, _ = locked
    with pytest.raises(DeviceBusyError, match="still locked after 0.5 s"):
        lock_exclusively(fd, config, wait=0.5)


def test_a_successor_opens_and_checks_before_it_claims(locked):
    """open_backend(claim_wait=None) opens a file another server still locks
    (a hand-over's successor gets ready first); claim() then waits for it."""
    config, _, holder = locked
    with pytest.raises(DeviceBusyError, match="is locked by another process"):
        open_backend(config)
    backend = open_backend(config, may_create=False, claim_wait=None)
    try:
        assert backend.size == 4096
        threading.Timer(0.2, fcntl.flock, (holder, fcntl.LOCK_UN)).start()
        backend.claim(10.0)
        with pytest.raises(BlockingIOError):
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        backend.close()
