"""The nbd backend: an export of an NBD server (qemu-nbd, nbdkit, nbd-server).

Every queue has its own connection, made and driven by the queue's C loop
(ublkd_nbd.c, through libnbd loaded at run time); Python only checks the
export when a device is created or recovered.  docs/nbd.md has the design.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from ublkd.backends import Backend, FastPath, Request, load_library
from ublkd.config import DeviceConfig, format_size
from ublkd.errors import BackendError, ConfigError
from ublkd.kernel.uring import Ring

log = logging.getLogger(__name__)

LIBNBD_PACKAGES = "apt-get install libnbd0 (Fedora: dnf install libnbd)"


@dataclass(frozen=True)
class Export:
    """What the server's handshake says of the export."""

    size: int
    read_only: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_zero: bool
    can_multi_conn: bool
    block_minimum: int  # 0: not advertised
    block_preferred: int
    block_maximum: int


class NbdBackend(Backend):
    def __init__(self, config: DeviceConfig):
        load_library(config, "libnbd", "the NBD client library", LIBNBD_PACKAGES)
        export = probe(config)
        self.uri = config.uri
        self.name = f"ublkd-{config.name}"
        self.size = device_size(config, export)
        if export.read_only and not config.read_only:
            raise ConfigError(f"{config.source}: the export {config.uri} is read-only; set "
                              f"read_only = true, or export it writable")
        self.supports_discard = export.can_trim
        self.supports_write_zeroes = export.can_zero
        self.volatile_cache = export.can_flush
        self.multi_conn = export.can_multi_conn
        self.read_only = config.read_only
        self.config = config

    def queues_for(self, wanted: int) -> int:
        """A connection per queue only where the server says that connections
        see each other's writes (multi-conn); else one queue, one connection."""
        if wanted > 1 and not self.multi_conn:
            log.warning("%s: the NBD server of %s does not advertise multi-conn (qemu-nbd: "
                        "add -e 0): 1 queue instead of %d", self.config.name, self.uri, wanted)
            return 1
        return wanted

    def submit(self, ring: Ring, request: Request, user_data: int) -> int | None:
        """Only ops the C loop does not know come here."""
        return -errno.EOPNOTSUPP

    def fast_path(self) -> FastPath:
        return FastPath("nbd", uri=self.uri, name=self.name,
                        reconnect_timeout=self.config.reconnect_timeout or 0.0)


def probe(config: DeviceConfig) -> Export:
    """Connect once and read the handshake, before any device exists."""
    from ublkd.kernel._uring import ffi, lib

    error = ffi.new("char[]", 512)
    error_number = ffi.new("int *")
    export = ffi.new("struct ublkd_nbd_export *")
    if lib.ublkd_nbd_probe(config.uri.encode(), f"ublkd-{config.name}".encode(), export,
                           error_number, error, len(error)) != 0:
        raise probe_error(config, error_number[0], ffi.string(error).decode(errors="replace"))
    return Export(size=export.size, read_only=bool(export.read_only),
                  can_flush=bool(export.can_flush), can_fua=bool(export.can_fua),
                  can_trim=bool(export.can_trim), can_zero=bool(export.can_zero),
                  can_multi_conn=bool(export.can_multi_conn),
                  block_minimum=export.block_minimum, block_preferred=export.block_preferred,
                  block_maximum=export.block_maximum)


def probe_error(config: DeviceConfig, error_number: int, message: str) -> Exception:
    """What a failed handshake means for the user: a server that cannot be
    reached is a BackendError (systemd tries again: it may be starting); one
    that answers but refuses the export is a mistake in the config."""
    if error_number in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES):
        return ConfigError(f"{config.source}: the unit's sandbox forbids reaching {config.uri} "
                           f"({message}); ublkd-generator allows TCP for nbd:// devices: run "
                           f"`systemctl daemon-reload`, then start ublkd@{config.name} again")
    if "connect:" in message or error_number in (errno.ECONNREFUSED, errno.ETIMEDOUT):
        return BackendError(f"{config.name}: cannot reach the NBD server of {config.uri}: "
                            f"{message}; is it running?")
    if error_number == errno.ENOTSUP:
        return ConfigError(f"{config.source}: the NBD server of {config.uri} refused the "
                           f"export as not supported ({message}), its answer when it requires "
                           f"TLS, which ublkd does not support yet; serve the export without "
                           f"TLS (nbdkit --tls=off, qemu-nbd without --tls-creds) on a unix "
                           f"socket or a trusted network")
    return ConfigError(f"{config.source}: the NBD server of {config.uri} refused the export: "
                       f"{message}")


def device_size(config: DeviceConfig, export: Export) -> int:
    """`size` if the export holds it, else the export's size in whole blocks."""
    block = config.logical_block_size
    if export.block_minimum > block:
        raise ConfigError(f"{config.source}: the export {config.uri} needs requests of at "
                          f"least {export.block_minimum} bytes; set logical_block_size to it")
    if config.size is None:
        size = export.size - export.size % block
        if size <= 0:
            raise ConfigError(f"{config.source}: the export {config.uri} is "
                              f"{format_size(export.size)}, smaller than one block")
        return size
    if export.size < config.size:
        raise ConfigError(f"{config.source}: the export {config.uri} is "
                          f"{format_size(export.size)}, smaller than size = "
                          f"{format_size(config.size)}")
    return config.size
