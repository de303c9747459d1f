"""ublk control commands: one method per command on /dev/ublk-control.

The commands travel as io_uring uring_cmds on a private ring with 128-byte
SQEs (the driver rejects others with EINVAL); the driver runs them in
io-wq and they may block (START_DEV waits until every queue has fetched),
so each method submits one command and waits for it with the GIL released.

Encoding.  Kernels 6.4+ take "ioctl-encoded" opcodes (``_IOR/_IOWR('u',
nr, struct)``); 6.1 knows only the legacy numbers; 6.4+ still takes those
when built with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=y (Debian: y).  We ask
GET_FEATURES (6.5+, ioctl form only): if it reports
UBLK_F_CMD_IOCTL_ENCODE we use the ioctl form, else the legacy numbers.
``ControlDevice.ioctl_encode`` tells the queue code which IO opcodes to
use, so one process speaks one encoding.

About IO commands and the device flag: in ublk_drv.c (6.12),
``ublk_check_cmd_op()`` accepts an opcode whose _IOC_TYPE is 'u', and one
whose type is 0 (legacy) only with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES;
control and IO handlers then switch on _IOC_NR().  The device's
UBLK_F_CMD_IOCTL_ENCODE flag is never consulted: ADD_DEV sets it (with
URING_CMD_COMP_IN_TASK) on every device as a report that the kernel
understands the encoding.  So IO commands do not have to be encoded on
such a device, but a kernel without LEGACY_OPCODES takes only the encoded
form, hence: same encoding everywhere.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ublkd.errors import DeviceNotFoundError, DriverNotLoadedError, KernelError, NotRootError
from ublkd.kernel import uapi
from ublkd.kernel.uring import Ring

CONTROL_PATH = "/dev/ublk-control"

ANY_DEV_ID = 0xFFFFFFFF  # ADD_DEV: let the kernel pick the id
NO_QUEUE = 0xFFFF  # header.queue_id of commands that are not per queue
SECTOR_SHIFT = 9

# errnos of GET_FEATURES on kernels that lack it: 6.1 looks the device up
# first (ENODEV) or does not know the opcode (EOPNOTSUPP); EINVAL for safety.
NO_GET_FEATURES = (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL)
NO_DEL_DEV_ASYNC = (errno.EOPNOTSUPP, errno.EINVAL)  # a kernel before 6.9
# How long delete_device waits for the id to be free, as DEL_DEV would; a
# device nothing holds is freed within DEL_DEV_ASYNC itself.
DELETE_WAIT = 2.0


@dataclass(frozen=True)
class DeviceInfo:
    """What the kernel knows about one device (struct ublksrv_ctrl_dev_info)."""

    dev_id: int
    nr_queues: int
    queue_depth: int
    state: int
    max_io_buf_bytes: int
    pid: int  # the server's pid from START_DEV/END_USER_RECOVERY; -1 or 0 when none
    flags: int  # UBLK_F_* the kernel accepted (ADD_DEV drops what it lacks)
    cookie: int = 0  # ublksrv_flags as ADD_DEV gave it: who owns the device (identity.py)
    owner_uid: int = 0
    owner_gid: int = 0

    @classmethod
    def from_struct(cls, raw: uapi.ublksrv_ctrl_dev_info) -> DeviceInfo:
        return cls(
            dev_id=raw.dev_id,
            nr_queues=raw.nr_hw_queues,
            queue_depth=raw.queue_depth,
            state=raw.state,
            max_io_buf_bytes=raw.max_io_buf_bytes,
            pid=raw.ublksrv_pid,
            flags=raw.flags,
            cookie=raw.ublksrv_flags,
            owner_uid=raw.owner_uid,
            owner_gid=raw.owner_gid,
        )

    @property
    def state_name(self) -> str:
        """DEAD, LIVE, QUIESCED or FAIL_IO (or the number of an unknown state)."""
        return uapi.STATE_NAMES.get(self.state, f"state {self.state}")

    @property
    def flag_names(self) -> list[str]:
        return uapi.feature_names(self.flags)


def _shift(size: int, name: str) -> int:
    """log2 of a size the kernel takes as a shift; 0 stays 0 (not set)."""
    if size == 0:
        return 0
    if size < 0 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two, not {size}")
    return size.bit_length() - 1


def _size(shift: int) -> int:
    return 0 if shift == 0 else 1 << shift


@dataclass
class Params:
    """Device parameters (struct ublk_params), sizes in bytes, lengths in sectors.

    io_min/io_opt of 0 mean "not set" (shift 0).  The discard part is sent
    only when one of its fields is non-zero; the kernel then wants
    discard_granularity > 0 and, with max_discard_sectors, exactly one
    segment.  The devt fields are read-only (GET_PARAMS fills them; the
    disk numbers stay 0 until START_DEV) and do not take part in ==.
    """

    dev_sectors: int
    logical_block_size: int = 512
    physical_block_size: int = 512
    io_min: int = 0
    io_opt: int = 0
    max_sectors: int = 0
    chunk_sectors: int = 0
    virt_boundary_mask: int = 0
    read_only: bool = False
    rotational: bool = False
    volatile_cache: bool = False
    fua: bool = False
    discard_alignment: int = 0
    discard_granularity: int = 0
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0
    max_discard_segments: int = 0
    char_major: int | None = field(default=None, compare=False)
    char_minor: int | None = field(default=None, compare=False)
    disk_major: int | None = field(default=None, compare=False)
    disk_minor: int | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        """Device size in bytes."""
        return self.dev_sectors << SECTOR_SHIFT

    @property
    def has_discard(self) -> bool:
        return any((self.discard_granularity, self.max_discard_sectors,
                    self.max_write_zeroes_sectors, self.max_discard_segments,
                    self.discard_alignment))

    def _attrs(self) -> int:
        return (
            (uapi.UBLK_ATTR_READ_ONLY if self.read_only else 0)
            | (uapi.UBLK_ATTR_ROTATIONAL if self.rotational else 0)
            | (uapi.UBLK_ATTR_VOLATILE_CACHE if self.volatile_cache else 0)
            | (uapi.UBLK_ATTR_FUA if self.fua else 0)
        )

    def to_struct(self) -> uapi.ublk_params:
        """The SET_PARAMS buffer: basic, plus discard when set; never devt."""
        raw = uapi.ublk_params(len=ctypes.sizeof(uapi.ublk_params),
                               types=uapi.UBLK_PARAM_TYPE_BASIC)
        basic = raw.basic
        basic.attrs = self._attrs()
        basic.logical_bs_shift = _shift(self.logical_block_size, "logical_block_size")
        basic.physical_bs_shift = _shift(self.physical_block_size, "physical_block_size")
        basic.io_min_shift = _shift(self.io_min, "io_min")
        basic.io_opt_shift = _shift(self.io_opt, "io_opt")
        basic.max_sectors = self.max_sectors
        basic.chunk_sectors = self.chunk_sectors
        basic.dev_sectors = self.dev_sectors
        basic.virt_boundary_mask = self.virt_boundary_mask
        if self.has_discard:
            raw.types |= uapi.UBLK_PARAM_TYPE_DISCARD
            raw.discard.discard_alignment = self.discard_alignment
            raw.discard.discard_granularity = self.discard_granularity
            raw.discard.max_discard_sectors = self.max_discard_sectors
            raw.discard.max_write_zeroes_sectors = self.max_write_zeroes_sectors
            raw.discard.max_discard_segments = self.max_discard_segments
        return raw

    @classmethod
    def from_struct(cls, raw: uapi.ublk_params) -> Params:
        """The parts of a GET_PARAMS buffer that its types say are there."""
        basic, discard, devt = raw.basic, raw.discard, raw.devt
        values: dict[str, Any] = dict(
            dev_sectors=basic.dev_sectors,
            logical_block_size=_size(basic.logical_bs_shift),
            physical_block_size=_size(basic.physical_bs_shift),
            io_min=_size(basic.io_min_shift),
            io_opt=_size(basic.io_opt_shift),
            max_sectors=basic.max_sectors,
            chunk_sectors=basic.chunk_sectors,
            virt_boundary_mask=basic.virt_boundary_mask,
            read_only=bool(basic.attrs & uapi.UBLK_ATTR_READ_ONLY),
            rotational=bool(basic.attrs & uapi.UBLK_ATTR_ROTATIONAL),
            volatile_cache=bool(basic.attrs & uapi.UBLK_ATTR_VOLATILE_CACHE),
            fua=bool(basic.attrs & uapi.UBLK_ATTR_FUA),
        )
        if raw.types & uapi.UBLK_PARAM_TYPE_DISCARD:
            values.update(
                discard_alignment=discard.discard_alignment,
                discard_granularity=discard.discard_granularity,
                max_discard_sectors=discard.max_discard_sectors,
                max_write_zeroes_sectors=discard.max_write_zeroes_sectors,
                max_discard_segments=discard.max_discard_segments,
            )
        if raw.types & uapi.UBLK_PARAM_TYPE_DEVT:
            values.update(char_major=devt.char_major, char_minor=devt.char_minor,
                          disk_major=devt.disk_major, disk_minor=devt.disk_minor)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, e.g. for the state file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Params:
        """Inverse of to_dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ublk parameter(s): {', '.join(unknown)}")
        return cls(**values)


class ControlDevice:
    """/dev/ublk-control and a private ring for its commands.

    Not thread-safe: one thread at a time (each command waits for its own
    completion on the shared ring).
    """

    def __init__(self, path: str = CONTROL_PATH):
        self.path = path
        self._fd = self._open(path)
        self._ring = None
        try:
            self._ring = Ring(4, sqe128=True)
            self._features = self._get_features()
        except BaseException:
            if self._ring is not None:
                self._ring.close()
            os.close(self._fd)
            raise
        self.ioctl_encode = bool(self._features & uapi.UBLK_F_CMD_IOCTL_ENCODE)
        self.ops = uapi.opcodes(self.ioctl_encode)

    @staticmethod
    def _open(path: str) -> int:
        """Open the control device, turning the usual failures into their fix."""
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DriverNotLoadedError(
                f"{path} does not exist: the ublk driver is not loaded; "
                f"run `modprobe ublk_drv` as root (kernel 6.0 or later, CONFIG_BLK_DEV_UBLK)"
            ) from None
        except PermissionError:
            raise NotRootError(
                f"cannot open {path}: managing ublk devices needs root / CAP_SYS_ADMIN"
            ) from None

    def close(self) -> None:
        if self._fd >= 0:
            self._ring.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ControlDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the plumbing -------------------------------------------------------

    def _run(self, name: str, cmd_op: int, dev_id: int | None,
             buf: ctypes.Structure | None = None, data: int = 0) -> int:
        """Send one command; a negative result becomes the matching UblkdError."""
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")
        header = uapi.ublksrv_ctrl_cmd(
            dev_id=ANY_DEV_ID if dev_id is None else dev_id, queue_id=NO_QUEUE, data=data)
        if buf is not None:
            header.addr = ctypes.addressof(buf)
            header.len = ctypes.sizeof(buf)
        res = self._ring.uring_cmd_sync(self._fd, cmd_op, bytes(header))
        if res < 0:
            raise _error(name, dev_id, -res)
        return res

    def _get_features(self) -> int:
        """GET_FEATURES, or 0 on kernels that lack it (before 6.5)."""
        features = ctypes.c_uint64(0)
        try:
            self._run("GET_FEATURES", uapi.UBLK_U_CMD_GET_FEATURES, None, features)
        except (KernelError, DeviceNotFoundError) as exc:
            if getattr(exc, "errno", None) in NO_GET_FEATURES:
                return 0
            raise
        return features.value

    # --- one method per command ----------------------------------------------

    def features(self) -> int:
        """UBLK_F_* this kernel supports (0 if it cannot say: before 6.5)."""
        return self._features

    def add_device(self, dev_id: int | None, nr_queues: int, queue_depth: int,
                   max_io_buf_bytes: int, flags: int, cookie: int = 0) -> DeviceInfo:
        """ADD_DEV: create /dev/ublkcN (dev_id None: the kernel picks N).

        `cookie` goes into ublksrv_flags, which the kernel keeps untouched
        and GET_DEV_INFO returns for as long as the device exists.

        Returns what the kernel filled in; its flags are what it really
        accepted (unknown flags are dropped silently), nr_queues may be cut
        to the CPU count and max_io_buf_bytes rounded down to pages.
        """
        if not 1 <= queue_depth <= uapi.UBLK_MAX_QUEUE_DEPTH:
            raise ValueError(f"queue_depth must be 1..{uapi.UBLK_MAX_QUEUE_DEPTH}, "
                             f"not {queue_depth}")
        if not 1 <= nr_queues <= uapi.UBLK_MAX_NR_QUEUES:
            raise ValueError(f"nr_queues must be 1..{uapi.UBLK_MAX_NR_QUEUES}, not {nr_queues}")
        info = uapi.ublksrv_ctrl_dev_info(
            nr_hw_queues=nr_queues, queue_depth=queue_depth,
            max_io_buf_bytes=max_io_buf_bytes,
            dev_id=ANY_DEV_ID if dev_id is None else dev_id, flags=flags,
            ublksrv_flags=cookie)
        self._run("ADD_DEV", self.ops.add_dev, dev_id, info)
        return DeviceInfo.from_struct(info)

    def set_params(self, dev_id: int, params: Params) -> None:
        """SET_PARAMS: only before the first START_DEV (EACCES after)."""
        self._run("SET_PARAMS", self.ops.set_params, dev_id, params.to_struct())

    def get_params(self, dev_id: int) -> Params:
        raw = uapi.ublk_params(len=ctypes.sizeof(uapi.ublk_params))
        self._run("GET_PARAMS", self.ops.get_params, dev_id, raw)
        return Params.from_struct(raw)

    def start_device(self, dev_id: int, pid: int) -> None:
        """START_DEV: blocks until every queue has fetched, then adds /dev/ublkbN."""
        self._run("START_DEV", self.ops.start_dev, dev_id, data=pid)

    def stop_device(self, dev_id: int) -> None:
        """STOP_DEV: removes /dev/ublkbN and aborts the queues' commands."""
        self._run("STOP_DEV", self.ops.stop_dev, dev_id)

    def delete_device(self, dev_id: int, wait: float = DELETE_WAIT) -> bool:
        """Stop if needed and remove /dev/ublkcN: DEL_DEV_ASYNC where the
        kernel has it, else DEL_DEV.  Returns whether the id is free again.

        DEL_DEV also waits until the kernel has freed the device, and a file
        system still mounted on /dev/ublkbN (its I/O fails once the device
        is stopped) holds it until it is unmounted: a `systemctl stop` hung
        until systemd killed the daemon (90 s) and ended failed, its state
        file left behind.  DEL_DEV_ASYNC does the same removal; the wait for
        the id is ours, and ends after `wait` seconds (False: a holder keeps
        the id until it lets go).
        """
        if self.ops.del_dev_async is not None:
            try:
                self._run("DEL_DEV_ASYNC", self.ops.del_dev_async, dev_id)
            except KernelError as exc:
                if getattr(exc, "errno", None) not in NO_DEL_DEV_ASYNC:
                    raise
            else:
                return self._wait_until_freed(dev_id, wait)
        self._run("DEL_DEV", self.ops.del_dev, dev_id)
        return True

    def _wait_until_freed(self, dev_id: int, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while True:
            try:
                self.get_info(dev_id)
            except DeviceNotFoundError:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def get_info(self, dev_id: int) -> DeviceInfo:
        """GET_DEV_INFO; DeviceNotFoundError if there is no such device."""
        info = uapi.ublksrv_ctrl_dev_info()
        self._run("GET_DEV_INFO", self.ops.get_dev_info, dev_id, info)
        return DeviceInfo.from_struct(info)

    def start_user_recovery(self, dev_id: int) -> None:
        """START_USER_RECOVERY: EBUSY while the old server is still going away."""
        self._run("START_USER_RECOVERY", self.ops.start_user_recovery, dev_id)

    def end_user_recovery(self, dev_id: int, pid: int) -> None:
        """END_USER_RECOVERY: waits for the new server's FETCHes, then LIVE."""
        self._run("END_USER_RECOVERY", self.ops.end_user_recovery, dev_id, data=pid)

    def quiesce_device(self, dev_id: int, timeout_ms: int) -> None:
        """QUIESCE_DEV (6.16+, devices made with UBLK_F_QUIESCE): the kernel
        stops handing out requests (new ones wait in it) and ABORTs every
        idle fetch; the requests the server holds are its to finish.  Once
        the server has closed /dev/ublkcN the device is QUIESCED, for the
        next server to recover.  EBUSY: some queue had no idle tag within
        `timeout_ms`."""
        self._run("QUIESCE_DEV", uapi.UBLK_U_CMD_QUIESCE_DEV, dev_id, data=timeout_ms)


def device_ids() -> list[int]:
    """Ids of every ublk device, from the driver's char device class in sysfs."""
    class_dir = Path("/sys/class/ublk-char")
    if not class_dir.is_dir():
        return []
    return sorted(int(entry.name[len("ublkc"):]) for entry in class_dir.glob("ublkc*"))


def _error(command: str, dev_id: int | None, err: int) -> Exception:
    """The UblkdError for a failed command; the errno rides along as .errno."""
    device = "any device" if dev_id is None else f"device {dev_id}"
    code = errno.errorcode.get(err, str(err))
    what = f"ublk {command} ({device}) failed: {code} ({os.strerror(err)})"
    exc: Exception
    if err == errno.ENODEV and dev_id is not None:
        exc = DeviceNotFoundError(f"{what}: there is no /dev/ublkc{dev_id}")
    elif err == errno.EACCES and command == "SET_PARAMS":
        exc = KernelError(f"{what}: parameters cannot change once the device was started")
    elif err in (errno.EPERM, errno.EACCES):
        exc = NotRootError(f"{what}: needs root / CAP_SYS_ADMIN")
    else:
        exc = KernelError(what)
    exc.errno = err  # type: ignore[attr-defined]
    return exc
