"""The file backend: a regular file or a block device, through io_uring.

O_DIRECT is used when the file takes it for the device's block size (probed
with one aligned read), so the page cache does not hold a second copy of
what the ublk device's own cache holds; otherwise buffered I/O.

The queue's C loop serves the requests (`fast_path`) through io_uring on
the queue's ring.  Files on tmpfs/ramfs are the exception: io_uring cannot
read them without blocking (no FMODE_NOWAIT) and hands every request to an
io-wq worker thread, two thread switches for what is a memcpy; for those
the loop calls pread/pwrite itself (docs/performance.md has the numbers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
from pathlib import Path

from ublkd.backends import Backend, FastPath, Request
from ublkd.config import DeviceConfig, format_size
from ublkd.errors import BackendError, DeviceBusyError
from ublkd.kernel import uapi
from ublkd.kernel.uring import Ring

BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = (TMPFS_MAGIC, RAMFS_MAGIC)


class FileBackend(Backend):
    supports_discard = True

    def __init__(self, config: DeviceConfig, may_create: bool = True):
        self.path = config.path
        self.fd = -1
        ensure_exists(config, may_create)
        self.fd, self.direct = open_backing(self.path, config.logical_block_size)
        try:
            lock_exclusively(self.fd, config)
            self.size = checked_size(self.fd, config)
        except BaseException:
            os.close(self.fd)
            raise
        self.inline = filesystem_type(self.fd) in MEMORY_FILESYSTEMS and not nowait_works(self.fd)

    def fast_path(self) -> FastPath:
        return FastPath("file", self.fd, inline=self.inline)

    def submit(self, ring: Ring, request: Request, user_data: int) -> int | None:
        op = request.op
        if op == uapi.UBLK_IO_OP_READ:
            ring.prep_read(self.fd, request.buffer, request.length, request.offset, user_data)
        elif op == uapi.UBLK_IO_OP_WRITE:
            ring.prep_write(self.fd, request.buffer, request.length, request.offset, user_data)
        elif op == uapi.UBLK_IO_OP_FLUSH:
            ring.prep_fsync(self.fd, user_data, datasync=True)
        elif op == uapi.UBLK_IO_OP_DISCARD:
            ring.prep_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                request.offset, request.length, user_data)
        elif op == uapi.UBLK_IO_OP_WRITE_ZEROES:
            ring.prep_fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                request.offset, request.length, user_data)
        else:
            return -errno.EOPNOTSUPP
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ensure_exists(config: DeviceConfig, may_create: bool) -> None:
    """Create a missing backing file, sparse, when the config gives a size."""
    path: Path = config.path
    if path.exists():
        return
    if not may_create:
        raise BackendError(
            f"{config.source}: backing file {path} is missing, but device {config.name} "
            f"had data in it (its state file says so). Is the file system holding it "
            f"mounted? ublkd does not create a new empty file in its place; to start "
            f"over empty, remove the device (`ublkd delete {config.name}`) first."
        )
    if config.size is None:
        raise BackendError(
            f"{config.source}: backing file {path} does not exist. Create it "
            f"(e.g. `truncate -s 1G {path}`) or set `size` in the config so that "
            f"ublkd creates it, sparse."
        )
    if not path.parent.is_dir():
        raise BackendError(
            f"{config.source}: cannot create backing file {path}: directory "
            f"{path.parent} does not exist"
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, config.size)
    finally:
        os.close(fd)


def open_backing(path: Path, block_size: int) -> tuple[int, bool]:
    """Open read-write, with O_DIRECT if an aligned read of one block works."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise BackendError(f"cannot open backing file {path}: {exc.strerror}") from exc
    else:
        if direct_read_works(fd, block_size):
            return fd, True
        os.close(fd)
    try:
        return os.open(path, flags), False
    except OSError as exc:
        raise BackendError(f"cannot open backing file {path}: {exc.strerror}") from exc


def direct_read_works(fd: int, block_size: int) -> bool:
    buffer = mmap.mmap(-1, max(block_size, mmap.PAGESIZE))
    try:
        os.preadv(fd, [memoryview(buffer)[:block_size]], 0)
        return True
    except OSError:
        return False
    finally:
        buffer.close()


def filesystem_type(fd: int) -> int | None:
    """f_type of fstatfs(fd) (a *_MAGIC number), None if it cannot be had."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def nowait_works(fd: int) -> bool:
    """Whether the file takes RWF_NOWAIT: then io_uring serves it without a worker thread."""
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        os.preadv(fd, [buffer], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return True  # supported, the data just was not at hand
    except OSError:
        return False  # EOPNOTSUPP: no FMODE_NOWAIT
    finally:
        buffer.close()


def lock_exclusively(fd: int, config: DeviceConfig) -> None:
    """Two servers writing one file would corrupt it: refuse the second."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DeviceBusyError(
            f"{config.source}: backing file {config.path} is locked by another "
            f"process (another ublkd device serving it?); `fuser -v {config.path}` "
            f"shows who"
        ) from None


def checked_size(fd: int, config: DeviceConfig) -> int:
    """The device size: the config's, or the file's; checked against the file."""
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode):
        available = int.from_bytes(fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)), "little")
    elif stat.S_ISREG(info.st_mode):
        available = info.st_size
    else:
        raise BackendError(
            f"{config.source}: {config.path} is neither a regular file nor a block device"
        )
    if config.size is None:
        if available == 0 or available % config.logical_block_size:
            raise BackendError(
                f"{config.source}: backing file {config.path} is {available} bytes, not a "
                f"non-zero multiple of logical_block_size {config.logical_block_size}; "
                f"set `size` in the config"
            )
        return available
    if available < config.size:
        raise BackendError(
            f"{config.source}: backing file {config.path} is {format_size(available)}, "
            f"smaller than size = {format_size(config.size)}; grow it "
            f"(`truncate -s {config.size} {config.path}`) or lower `size`"
        )
    return config.size
