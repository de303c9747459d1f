"""The file backend: a regular file or a block device, through io_uring.

O_DIRECT is used when the file takes it for the device's block size (probed
with one aligned read), so the page cache does not hold a second copy of
what the ublk device's own cache holds; otherwise buffered I/O.

The queue's C loop serves the requests (`fast_path`) through io_uring on
the queue's ring.  Files on tmpfs/ramfs are the exception: io_uring cannot
read them without blocking (no FMODE_NOWAIT) and hands every request to an
io-wq worker thread, two thread switches for what is a memcpy; for those
the loop calls pread/pwrite itself (docs/performance.md has the numbers).

DISCARD and WRITE_ZEROES are fallocate() calls (PUNCH_HOLE, ZERO_RANGE),
which not every file system has: tmpfs punches holes but cannot zero a
range, and an overlay passes on what its upper file system does.  A mode
that fails fails every request, and the kernel logs each one ("operation
not supported error ... op 0x9:(WRITE_ZEROES)").  So `probe_fallocate`
tries both modes at open, on an O_TMPFILE in the backing file's
directory (never on the data), and the device advertises only what works:
without write-zeroes the block layer writes zero pages itself.  The
device keeps what it advertised at create across recoveries, while a
recovered daemon probes again; should the file system have lost a mode
meanwhile, the serving path falls back: a DISCARD does nothing (it is a
hint), a WRITE_ZEROES writes zeros (`write_zeros`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ublkd.backends import Backend, FastPath, Request
from ublkd.config import DeviceConfig, format_size
from ublkd.errors import BackendError, ConfigError, DeviceBusyError
from ublkd.kernel import uapi
from ublkd.kernel.uring import Ring

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = (TMPFS_MAGIC, RAMFS_MAGIC)
PROBE_BYTES = 64 * 1024  # size of the probe's temporary file: a few blocks of any file system
ZEROS_CHUNK = 1024 * 1024  # write_zeros writes this much per call
# Seconds between tries of a lock the old server still holds: often at first
# (in a hand-over the old worker lets go within a few hundred ms, and every
# ms of the wait is I/O paused), then gently.
LOCK_POLL_FAST = 0.002
LOCK_POLL_FAST_SECONDS = 2.0
LOCK_POLL = 0.02


@dataclass(frozen=True)
class FallocateModes:
    """Which fallocate() modes the backing file takes (both with KEEP_SIZE)."""

    punch_hole: bool  # serves DISCARD
    zero_range: bool  # serves WRITE_ZEROES

    def __str__(self) -> str:
        return (f"fallocate PUNCH_HOLE {'works' if self.punch_hole else 'fails'}, "
                f"ZERO_RANGE {'works' if self.zero_range else 'fails'}")


class FileBackend(Backend):
    volatile_cache = True  # the page cache, or the disk's: FLUSH is fdatasync

    def __init__(self, config: DeviceConfig, may_create: bool = True):
        self.config = config
        self.path = config.path
        self.fd = -1
        self.mapping: mmap.mmap | None = None
        ensure_exists(config, may_create)
        refuse_unusable_kind(config)
        self.fd, self.direct = open_backing(self.path, config.logical_block_size)
        try:
            self.size = checked_size(self.fd, config)
            self.modes = probe_fallocate(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            raise
        log.info("%s: backing file %s: %s", config.name, self.path, self.modes)
        self.supports_discard = self.modes.punch_hole
        self.supports_write_zeroes = self.modes.zero_range
        self.inline = filesystem_type(self.fd) in MEMORY_FILESYSTEMS and not nowait_works(self.fd)

    def claim(self, wait: float) -> None:
        lock_exclusively(self.fd, self.config, wait)

    def shared_mapping(self) -> mmap.mmap:
        """One mapping of the file's first `size` bytes for all queues: the
        file's own pages (tmpfs: its memory), which the kernel copies each
        request from or into (UBLK_F_USER_COPY)."""
        if self.mapping is None:
            self.mapping = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
        return self.mapping

    def fast_path(self) -> FastPath:
        return FastPath("file", self.fd, inline=self.inline,
                        punch_hole=self.modes.punch_hole, zero_range=self.modes.zero_range)

    def submit(self, ring: Ring, request: Request, user_data: int) -> int | None:
        op = request.op
        if op == uapi.UBLK_IO_OP_READ:
            ring.prep_read(self.fd, request.buffer, request.length, request.offset, user_data)
        elif op == uapi.UBLK_IO_OP_WRITE:
            ring.prep_write(self.fd, request.buffer, request.length, request.offset, user_data)
        elif op == uapi.UBLK_IO_OP_FLUSH:
            ring.prep_fsync(self.fd, user_data, datasync=True)
        elif op == uapi.UBLK_IO_OP_DISCARD:
            if not self.modes.punch_hole:
                return 0  # a hint: doing nothing is a valid answer
            ring.prep_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                request.offset, request.length, user_data)
        elif op == uapi.UBLK_IO_OP_WRITE_ZEROES:
            if not self.modes.zero_range:
                return write_zeros(self.fd, request.offset, request.length)
            ring.prep_fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                request.offset, request.length, user_data)
        else:
            return -errno.EOPNOTSUPP
        return None

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()  # the queues, joined before, released it
            self.mapping = None
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
            f"{path.parent} does not exist (a file system not mounted yet? "
            f"ublkd@{config.name} tries again)"
        )
    if path.is_symlink():
        raise BackendError(
            f"{config.source}: backing file {path} is a symbolic link to "
            f"{os.readlink(path)}, which does not exist (a file system not mounted yet? "
            f"ublkd@{config.name} tries again); ublkd does not create a file through it")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise BackendError(f"{config.source}: cannot create backing file {path}: "
                           f"{error.strerror}") from None
    try:
        os.ftruncate(fd, config.size)
    finally:
        os.close(fd)


def refuse_unusable_kind(config: DeviceConfig) -> None:
    """Only a regular file or a block device can back a device.

    A directory, character device, socket or FIFO in `path` is a mistake in
    the config that no restart mends: ConfigError (exit 2, which the unit
    does not restart), checked before open(), which could block on a FIFO.
    """
    mode = os.stat(config.path).st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    fix = "point it at a regular file or a block device"
    if stat.S_ISDIR(mode):
        fix += f' (e.g. "{config.path / config.name}.img" with `size` set: ublkd creates it)'
    raise ConfigError(f'{config.source}: path = "{config.path}" of device {config.name} '
                      f'is {file_kind(mode)}; {fix}')


def file_kind(mode: int) -> str:
    """'a directory', 'a character device', ... for an st_mode."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), f"of file type {mode:#o}")


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


def libc() -> ctypes.CDLL:
    """The C library the interpreter runs on (dlopen(NULL)).

    Not ctypes.util.find_library("c"): that runs `ldconfig -p` in a
    subprocess on each call, and opening the backend, on the recovery path
    of a restarted unit, asked three times.
    """
    return ctypes.CDLL(None, use_errno=True)


def filesystem_type(fd: int) -> int | None:
    """f_type of fstatfs(fd) (a *_MAGIC number), None if it cannot be had."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc().fstatfs(fd, buf) != 0:
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


def probe_fallocate(fd: int, path: Path) -> FallocateModes:
    """Which fallocate modes serve the backing file, found without touching its data.

    A block device zeroes any range (blkdev_fallocate falls back to writing
    zeros) and punches holes only as a write-zeroes command, which it may
    lack: the kernel's loop driver decides the same way.  For a file, both
    modes are tried on an unnamed temporary file in its directory, which
    vanishes with its descriptor; when none can be made there (a file
    system without O_TMPFILE, a read-only directory), nothing is assumed.
    """
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode):
        return FallocateModes(punch_hole=block_device_writes_zeroes(info.st_rdev),
                              zero_range=True)
    try:
        probe = os.open(path.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("%s: cannot probe fallocate on a temporary file in %s (%s); "
                    "the device gets neither discard nor write-zeroes",
                    path, path.parent, exc.strerror)
        return FallocateModes(punch_hole=False, zero_range=False)
    try:
        os.ftruncate(probe, PROBE_BYTES)
        return FallocateModes(
            punch_hole=fallocate_works(probe, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE),
            zero_range=fallocate_works(probe, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
    finally:
        os.close(probe)


def fallocate_works(fd: int, mode: int) -> bool:
    """Whether fallocate(fd, mode) over the first PROBE_BYTES succeeds."""
    fallocate = libc().fallocate
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return fallocate(fd, mode, 0, PROBE_BYTES) == 0


def block_device_writes_zeroes(rdev: int) -> bool:
    """Whether the block device has a write-zeroes command (its queue's limit > 0).

    A partition has no queue of its own: its disk's is one directory up.
    """
    device = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    for queue in (device / "queue", device / ".." / "queue"):
        try:
            return int((queue / "write_zeroes_max_bytes").read_text()) > 0
        except (OSError, ValueError):
            continue
    return False


def write_zeros(fd: int, offset: int, length: int) -> int:
    """WRITE_ZEROES without ZERO_RANGE: write zero bytes; 0 or a negative errno.

    Only a recovered device meets this: it advertised write-zeroes when it
    was created on a file system that had ZERO_RANGE.  Synchronous, in the
    queue's thread, from a page-aligned mapping (the file may be O_DIRECT).
    """
    done = 0
    with mmap.mmap(-1, min(length, ZEROS_CHUNK)) as zeros, memoryview(zeros) as view:
        try:
            while done < length:
                done += os.pwrite(fd, view[:length - done], offset + done)
        except OSError as exc:
            return -exc.errno
    return 0


def lock_exclusively(fd: int, config: DeviceConfig, wait: float) -> None:
    """Two servers writing one file would corrupt it: refuse the second.

    A recovering server waits up to `wait` seconds: the dead server's lock
    goes only when the kernel tears its rings down (the backing file is a
    registered file of each), some time after the process is gone.
    """
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited >= wait:
                break
        time.sleep(LOCK_POLL_FAST if waited < LOCK_POLL_FAST_SECONDS else LOCK_POLL)
    held = f"still locked after {wait:g} s" if wait else "locked"
    raise DeviceBusyError(
        f"{config.source}: backing file {config.path} is {held} by another process "
        f"(another ublkd device serving it?); `fuser -v {config.path}` shows who")


def checked_size(fd: int, config: DeviceConfig) -> int:
    """The device size: the config's, or the file's; checked against the file."""
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode):
        available = int.from_bytes(fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)), "little")
    else:  # a regular file: refuse_unusable_kind let nothing else through
        available = info.st_size
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
