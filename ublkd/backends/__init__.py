"""Backends: where a ublk device's bytes live.

A backend answers one request at a time for the queue that owns it.  It
either queues the work on the queue's io_uring (the completion comes back
to the queue with the user_data it was given) or answers at once.  Adding
a backend is one module here plus one line in `open_backend`.
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ublkd.config import DeviceConfig
from ublkd.errors import BackendError, MissingDependencyError
from ublkd.kernel.uring import Ring

# Backends that connect to a server when they open and when their queues
# start.  A server may take one client at a time (qemu-nbd without -e: a
# second connection gets no answer until the first closes), so a hand-over's
# successor connects only after the old server has let go of the device.
CONNECTING_BACKENDS = ("nbd",)


def connects_to_server(config: DeviceConfig) -> bool:
    return config.backend in CONNECTING_BACKENDS


@dataclass(frozen=True)
class FastPath:
    """What the queue's C loop may serve by itself, without calling `submit`.

    kind "nbd": every request on the queue's own connection to `uri`
    (backends/nbd.py); kind "rbd": every request through librbd on `image`
    (backends/rbd.py); kind "file": READ/WRITE/FLUSH/DISCARD/WRITE_ZEROES on `fd`, exactly as
    FileBackend.submit would (io_uring, or pread/pwrite in the queue thread
    when `inline`; DISCARD and WRITE_ZEROES with the fallocate modes the
    file takes, see backends/file.py); kind "null": what NullBackend.submit
    answers.
    """

    kind: str  # "file", "nbd", "rbd" or "null"
    fd: int = -1
    image: object = None  # rbd: the open image every queue starts its requests on
    uri: str = ""  # nbd: every queue connects to this export
    name: str = ""  # nbd: the connection's name in the server's logs
    reconnect_timeout: float = 0.0  # nbd: seconds I/O waits for a lost server; 0: forever
    inline: bool = False
    punch_hole: bool = False  # file: DISCARD punches a hole; else it does nothing
    zero_range: bool = False  # file: WRITE_ZEROES zeroes the range; else it goes to `submit`

    @property
    def connects(self) -> bool:
        """Whether the queue connects to a server for it: then only once it
        has its device (Queue.attach), see connects_to_server."""
        return self.kind in CONNECTING_BACKENDS


@dataclass(frozen=True)
class Request:
    """One ublk I/O, decoded from its descriptor (byte units)."""

    op: int  # UBLK_IO_OP_*
    offset: int
    length: int
    buffer: int  # address of the tag's I/O buffer


class Backend(ABC):
    """The per-device storage; one instance serves every queue."""

    size: int  # bytes the device exposes
    # What the device advertises when it is created (Device.params_for).
    supports_discard: bool = False
    supports_write_zeroes: bool = False
    # A write cache that FLUSH empties: the block layer then sends FLUSH.
    volatile_cache: bool = False
    # The device refuses writes in the block layer (the kernel's EPERM).
    read_only: bool = False

    @abstractmethod
    def submit(self, ring: Ring, request: Request, user_data: int) -> int | None:
        """Start `request` on `ring`, or answer at once.

        Returns None when an SQE tagged `user_data` was queued (its CQE's
        result is the answer), else the result itself: bytes done, or a
        negative errno.
        """

    def queues_for(self, wanted: int) -> int:
        """How many queues a new device gets when the config asks for `wanted`."""
        return wanted

    def fast_path(self) -> FastPath | None:
        """How the queue's C loop may serve common requests itself; None: all go to `submit`.

        `submit` stays the reference: the loop hands it every request it
        does not know how to serve.
        """
        return None

    def shared_mapping(self) -> mmap.mmap:
        """The storage mapped into memory, for a UBLK_F_USER_COPY device's
        queues to copy requests from and to; only a file has one."""
        raise BackendError(f"{type(self).__name__} cannot be mapped: a device made with "
                           f"UBLK_F_USER_COPY needs the file backend")

    def claim(self, wait: float) -> None:  # noqa: B027 (a hook: most storage has no owner)
        """Keep every other server off this storage (the file backend locks
        its file), waiting up to `wait` seconds for the previous server to
        let go.  Apart from opening, so that a successor opens and checks
        first, and only then tells the old server to let go."""

    def let_go(self) -> None:  # noqa: B027 (a hook: most claims end with the process)
        """At a hand-over, once the queues have nothing in flight: give up what
        `claim` took and the process's exit would not, or not at once (an rbd
        image's lock, and its watch, which would make the successor's first
        update of the image wait for it), so that the successor's claim need
        not break or wait for anything."""

    def close(self) -> None:  # noqa: B027 (a hook: a backend that holds nothing has none)
        """Release what open_backend took."""


def load_library(config: DeviceConfig, name: str, what: str, packages: str) -> None:
    """The client library a backend loads at run time (libnbd, librbd: their C
    side's ublkd_<backend>_load), or MissingDependencyError naming the
    package to install."""
    from ublkd.kernel._uring import ffi, lib

    error = ffi.new("char[]", 512)
    if getattr(lib, f"ublkd_{config.backend}_load")(error, len(error)) != 0:
        raise MissingDependencyError(
            f"{config.source}: backend = \"{config.backend}\" needs {name}, {what}, which is "
            f"not installed ({ffi.string(error).decode(errors='replace')}); install it: "
            f"{packages}")


def open_backend(config: DeviceConfig, may_create: bool = True,
                 claim_wait: float | None = 0.0) -> Backend:
    """The backend `config` asks for, opened, checked and claimed.

    may_create=False when the device held data before (a recovery, or a
    state file left by a reboot): a missing backing file is then an error,
    never a new empty file that would silently replace the data.
    claim_wait: how long a recovery waits for the dead server's claim
    (Backend.claim) to go; None: not claimed yet, the caller claims.
    """
    backend = _open_backend(config, may_create)
    if claim_wait is not None:
        try:
            backend.claim(claim_wait)
        except BaseException:
            backend.close()
            raise
    return backend


def _open_backend(config: DeviceConfig, may_create: bool) -> Backend:
    if config.backend == "null":
        from ublkd.backends.null import NullBackend

        return NullBackend(config)
    if config.backend == "nbd":
        from ublkd.backends.nbd import NbdBackend

        return NbdBackend(config)
    if config.backend == "rbd":
        from ublkd.backends.rbd import RbdBackend

        return RbdBackend(config)
    from ublkd.backends.file import FileBackend

    return FileBackend(config, may_create)
