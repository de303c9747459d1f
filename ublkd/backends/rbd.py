"""The rbd backend: an image in a Ceph cluster, through librbd.

One cluster session and one image handle per device (librbd is
thread-safe), opened here; each queue's C loop starts its requests with
rbd_aio_* and commits them as librbd completes them (ublkd_rbd.c).  Python
only opens, checks and locks the image.  docs/rbd.md has the design.

The lock: the serving session takes the image's exclusive lock by hand,
which librbd, unlike its automatic lock, never hands to another client
that asks.  A killed worker's session keeps that lock until its watch times
out (about 30 s), and librbd would make the new worker's first write wait
that long; so the image's metadata names the session that holds it (key
ublkd.session), and a recovery breaks the lock of its own dead predecessor
at once.  Any other holder that is alive is never broken: the start fails.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from ublkd.backends import Backend, FastPath, Request, load_library
from ublkd.config import DeviceConfig, format_size
from ublkd.errors import BackendError, ConfigError
from ublkd.kernel.uring import Ring

log = logging.getLogger(__name__)

LIBRBD_PACKAGES = "apt-get install librbd1 (Fedora: dnf install librbd1)"
SESSION_KEY = "ublkd.session"
CONNECT_TIMEOUT = 20  # seconds for the monitors to answer at start
LOCK_POLL = 0.2  # seconds between looks at the lock while a predecessor lets go
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2


@dataclass(frozen=True)
class Session:
    """Who holds the lock, as the image's metadata records it."""

    address: str  # "127.0.0.1:0/1855586382": librbd names a lock's owner by it
    host: str
    device: str
    pid: int

    def encode(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> Session | None:
        try:
            data = json.loads(text)
            return cls(address=str(data["address"]), host=str(data["host"]),
                       device=str(data["device"]), pid=int(data["pid"]))
        except (ValueError, KeyError, TypeError):
            return None


class RbdBackend(Backend):
    supports_discard = True
    supports_write_zeroes = True
    # No volatile cache: librbd's is off (ublkd_rbd.c), a write is answered
    # once the OSDs have it; a killed worker must not take writes with it.
    volatile_cache = False

    def __init__(self, config: DeviceConfig):
        load_library(config, "librbd", "Ceph's block device library", LIBRBD_PACKAGES)
        self.config = config
        self.image, image_size, features, address = open_image(config)
        try:
            self.size = device_size(config, image_size)
        except BaseException:
            self.close()
            raise
        self.read_only = config.read_only
        self.locking = bool(features & RBD_FEATURE_EXCLUSIVE_LOCK) and not config.read_only
        self.session = Session(address=address, host=socket.gethostname(),
                               device=config.name, pid=os.getpid())
        if not self.locking and not config.read_only:
            log.warning("%s: image %s has no exclusive-lock feature: nothing keeps another "
                        "client from writing to it at the same time (rbd feature enable %s "
                        "exclusive-lock)", config.name, config.rbd_spec, config.rbd_spec)

    def submit(self, ring: Ring, request: Request, user_data: int) -> int | None:
        """Only ops the C loop does not know come here."""
        return -errno.EOPNOTSUPP

    def fast_path(self) -> FastPath:
        return FastPath("rbd", image=self.image)

    def claim(self, wait: float) -> None:
        """Hold the image's exclusive lock: free, or freed by breaking the lock of
        a holder that is dead; a live holder gets `wait` seconds to let go (a
        hand-over's predecessor), then the start fails naming it."""
        from ublkd.kernel._uring import lib

        if not self.locking:
            return
        deadline = time.monotonic() + wait
        while True:
            holders = self.lock_owners()
            if not holders:
                result = lib.ublkd_rbd_lock_acquire(self.image)
                if result == 0:
                    self.record_session()
                    return
                if result not in (-errno.EBUSY, -errno.EROFS, -errno.EAGAIN):
                    raise self.cluster_error("taking the image's exclusive lock", result)
            live = [holder for holder in holders if not self.break_if_dead(holder)]
            if time.monotonic() >= deadline:
                raise self.in_use_error(live or holders)
            if live or not holders:
                time.sleep(LOCK_POLL)

    def lock_owners(self) -> list[str]:
        from ublkd.kernel._uring import ffi, lib

        owners = ffi.new("char[]", 1024)
        count = lib.ublkd_rbd_lock_owners(self.image, owners, len(owners))
        if count < 0:
            raise self.cluster_error("reading the image's lock", count)
        return ffi.string(owners).decode(errors="replace").split()

    def break_if_dead(self, holder: str) -> bool:
        """Break `holder`'s lock if it is certainly dead: our own predecessor
        (this host, this device) whose process is gone, or a client whose
        watch on the image has expired.  librbd blocklists it first."""
        recorded = self.recorded_session()
        ours = (recorded is not None and recorded.address == holder
                and recorded.host == self.session.host and recorded.device == self.config.name)
        if ours and process_exists(recorded.pid):
            return False  # a live predecessor: it lets go when it has handed over
        if not ours and holder in self.watchers():
            return False
        why = ("its ublkd process is gone" if ours
               else "its watch on the image has expired")
        log.warning("%s: breaking the exclusive lock of %s on %s (%s); it is blocklisted",
                    self.config.name, holder, self.config.rbd_spec, why)
        from ublkd.kernel._uring import lib

        result = lib.ublkd_rbd_lock_break(self.image, holder.encode())
        if result < 0 and result != -errno.ENOENT:
            raise self.cluster_error(f"breaking the lock of {holder}", result)
        return True

    def recorded_session(self) -> Session | None:
        from ublkd.kernel._uring import ffi, lib

        value = ffi.new("char[]", 512)
        if lib.ublkd_rbd_metadata_get(self.image, SESSION_KEY.encode(), value, len(value)) < 0:
            return None
        return Session.decode(ffi.string(value).decode(errors="replace"))

    def record_session(self) -> None:
        """Name our session as the lock's holder, for the next worker."""
        from ublkd.kernel._uring import lib

        result = lib.ublkd_rbd_metadata_set(self.image, SESSION_KEY.encode(),
                                            self.session.encode().encode())
        if result < 0:
            log.warning("%s: cannot record the lock's holder in %s's metadata (%s): a "
                        "recovery will wait for this session's watch to expire",
                        self.config.name, self.config.rbd_spec, os.strerror(-result))

    def watchers(self) -> set[str]:
        """The addresses of the clients that have the image open read-write."""
        from ublkd.kernel._uring import ffi, lib

        addresses = ffi.new("char[]", 4096)
        count = lib.ublkd_rbd_watchers(self.image, addresses, len(addresses))
        if count < 0:
            raise self.cluster_error("listing the image's watchers", count)
        return set(ffi.string(addresses).decode(errors="replace").split())

    def in_use_error(self, holders: list[str]) -> BackendError:
        return ImageInUseError(
            f"{self.config.name}: image {self.config.rbd_spec} is in use: the client at "
            f"{', '.join(holders)} holds its exclusive lock and is alive (another ublkd, "
            f"rbd-nbd or krbd mapping; `rbd status {self.config.rbd_spec}` shows it); "
            f"unmap it there, then start ublkd@{self.config.name} again")

    def cluster_error(self, step: str, result: int) -> BackendError:
        return BackendError(f"{self.config.name}: {step} of {self.config.rbd_spec} failed: "
                            f"{os.strerror(-result)}")

    def let_go(self) -> None:
        """Close the image, releasing its lock and its watch: both would outlive
        this process, which exits without closing, and the successor's first
        update of the image (its session record) would wait 5 s for this
        watch to answer."""
        from ublkd.kernel._uring import lib

        result = lib.ublkd_rbd_let_go(self.image)
        if result < 0:
            log.warning("%s: cannot close %s (%s); the successor breaks its lock once this "
                        "process is gone", self.config.name, self.config.rbd_spec,
                        os.strerror(-result))

    def close(self) -> None:
        """Close the image: librbd releases our lock with it."""
        from ublkd.kernel._uring import lib

        if self.image is not None:  # open_image never returns NULL
            lib.ublkd_rbd_close(self.image)
        self.image = None


class ImageInUseError(BackendError):
    """Another live client holds the image: a restart cannot help, an admin can."""

    exit_code = ConfigError.exit_code


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_image(config: DeviceConfig) -> tuple[object, int, int, str]:
    """(handle, size, features, our session's address), or the error a user can act on."""
    from ublkd.kernel._uring import ffi, lib

    strings = [ffi.new("char[]", value.encode()) if value else ffi.NULL
               for value in (config.ceph_conf, config.client, config.keyring, config.pool,
                             config.namespace, config.image, config.snapshot)]
    target = ffi.new("struct ublkd_rbd_target *", {
        "conf": strings[0], "client": strings[1], "keyring": strings[2], "pool": strings[3],
        "name_space": strings[4], "image": strings[5], "snapshot": strings[6],
        "read_only": int(config.read_only), "connect_timeout": CONNECT_TIMEOUT,
        "io_timeout": int(config.io_timeout or 0)})
    facts = ffi.new("struct ublkd_rbd_facts *")
    error = ffi.new("char[]", 512)
    error_number = ffi.new("int *")
    image = lib.ublkd_rbd_open(target, facts, error_number, error, len(error))
    if image == ffi.NULL:
        raise open_error(config, error_number[0], ffi.string(error).decode(errors="replace"))
    return image, facts.size, facts.features, ffi.string(facts.address).decode()


def open_error(config: DeviceConfig, error_number: int, message: str) -> Exception:
    """What a failed open means for the user: a cluster that does not answer
    is a BackendError (systemd tries again: it may be starting); a wrong
    name, key or file is a mistake in the config, which no restart fixes."""
    spec, conf = config.rbd_spec, config.ceph_conf
    client = f"client.{config.client}"
    step, _, _ = message.partition(":")
    if step == "reading the ceph.conf":
        return ConfigError(f"{config.source}: cannot read the Ceph configuration {conf} "
                           f"({os.strerror(error_number)}); install it (ceph-common, or copy "
                           f"it from the cluster) or set ceph_conf")
    if step == "connecting to the cluster":
        if error_number in (errno.ETIMEDOUT, errno.ECONNREFUSED, errno.EHOSTUNREACH):
            return BackendError(f"{config.name}: the Ceph monitors in {conf} did not answer "
                                f"within {CONNECT_TIMEOUT} s ({message}); is the cluster up "
                                f"and reachable from this host? (After adding the config, "
                                f"`systemctl daemon-reload` lets the unit reach the network.)")
        if error_number == errno.EAFNOSUPPORT:
            return ConfigError(f"{config.source}: the unit's sandbox forbids reaching the "
                               f"cluster ({message}); ublkd-generator allows TCP for rbd "
                               f"devices: run `systemctl daemon-reload`, then start "
                               f"ublkd@{config.name} again")
        keyring = config.keyring or "the keyring ceph.conf names"
        return ConfigError(f"{config.source}: the cluster refused {client} ({message}); "
                           f"check client and keyring ({keyring}): `ceph -n {client} "
                           f"--keyring KEYRING auth get {client}` must work")
    if step == "opening the pool" and error_number == errno.ENOENT:
        return ConfigError(f"{config.source}: pool '{config.pool}' does not exist in the "
                           f"cluster of {conf}; `ceph osd pool ls` lists the pools")
    if step == "opening the image" and error_number == errno.ENOENT:
        return ConfigError(f"{config.source}: image {spec} does not exist; `rbd ls "
                           f"{config.pool}` lists the images (`rbd create {spec} --size 10G` "
                           f"makes one)")
    if error_number in (errno.EACCES, errno.EPERM):
        return ConfigError(f"{config.source}: {client} may not open {spec} ({message}); give "
                           f"it the caps: `ceph auth caps {client} mon 'profile rbd' osd "
                           f"'profile rbd pool={config.pool}'`")
    return BackendError(f"{config.name}: cannot open image {spec}: {message}")


def device_size(config: DeviceConfig, image_size: int) -> int:
    """`size` if the image holds it, else the image's size in whole blocks."""
    block = config.logical_block_size
    if config.size is None:
        size = image_size - image_size % block
        if size <= 0:
            raise ConfigError(f"{config.source}: image {config.rbd_spec} is "
                              f"{format_size(image_size)}, smaller than one block")
        return size
    if image_size < config.size:
        raise ConfigError(f"{config.source}: image {config.rbd_spec} is "
                          f"{format_size(image_size)}, smaller than size = "
                          f"{format_size(config.size)}; `rbd resize` it or lower size")
    return config.size
