"""The ublk kernel ABI: constants and struct layouts, nothing else.

Mirrors ``include/uapi/linux/ublk_cmd.h`` of Linux 6.12 (the test bed's
kernel).  Layouts were checked against the BTF of the test bed's
``ublk_drv`` module (6.12.117) and against the 6.1 header on the build
host by ``tests/unit/test_uapi.py``; numbers the 6.1 header lacks say
since when they exist.  Offsets are for x86-64 (ctypes' native alignment
is the C compiler's).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from dataclasses import dataclass

# --- ioctl number encoding (asm-generic/ioctl.h) ---------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_TYPESHIFT = _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """The kernel's _IOC(): how the ioctl-style ublk opcodes are built."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (ord(type_) << _IOC_TYPESHIFT)
        | nr
    )


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, "u", nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, "u", nr, size)


def ioc_nr(cmd_op: int) -> int:
    """The command number inside an opcode (what the driver switches on)."""
    return cmd_op & ((1 << _IOC_NRBITS) - 1)


# --- structs ----------------------------------------------------------------


class ublksrv_ctrl_cmd(ctypes.Structure):
    """Control command header, carried in the SQE's cmd area (32 bytes).

    6.3+ layout; 6.1 has ``data[2]`` where ``dev_path_len``/``pad``/
    ``reserved`` are now (same size, same offsets up to ``data``).
    """

    _fields_ = [
        ("dev_id", ctypes.c_uint32),
        ("queue_id", ctypes.c_uint16),  # 0xffff unless the command is per queue
        ("len", ctypes.c_uint16),  # length of the buffer at addr
        ("addr", ctypes.c_uint64),
        ("data", ctypes.c_uint64),  # inline argument, e.g. the pid of START_DEV
        ("dev_path_len", ctypes.c_uint16),  # unprivileged devices only
        ("pad", ctypes.c_uint16),
        ("reserved", ctypes.c_uint32),
    ]


class ublksrv_ctrl_dev_info(ctypes.Structure):
    """Device info of ADD_DEV (in/out) and GET_DEV_INFO (out), 64 bytes."""

    _fields_ = [
        ("nr_hw_queues", ctypes.c_uint16),
        ("queue_depth", ctypes.c_uint16),
        ("state", ctypes.c_uint16),
        ("pad0", ctypes.c_uint16),
        ("max_io_buf_bytes", ctypes.c_uint32),
        ("dev_id", ctypes.c_uint32),
        ("ublksrv_pid", ctypes.c_int32),
        ("pad1", ctypes.c_uint32),
        ("flags", ctypes.c_uint64),
        ("ublksrv_flags", ctypes.c_uint64),  # ours; the kernel stores it untouched
        ("owner_uid", ctypes.c_uint32),  # 6.3+ (6.1: reserved0)
        ("owner_gid", ctypes.c_uint32),
        ("reserved1", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64),
    ]


class ublksrv_io_desc(ctypes.Structure):
    """One request as the driver describes it in the mmapped array (24 bytes)."""

    _fields_ = [
        ("op_flags", ctypes.c_uint32),  # op in bits 0-7, UBLK_IO_F_* above
        ("nr_sectors", ctypes.c_uint32),  # nr_zones for REPORT_ZONES
        ("start_sector", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    ]


class ublksrv_io_cmd(ctypes.Structure):
    """IO command payload (FETCH/COMMIT/NEED_GET_DATA), 16 bytes."""

    _fields_ = [
        ("q_id", ctypes.c_uint16),
        ("tag", ctypes.c_uint16),
        ("result", ctypes.c_int32),
        ("addr", ctypes.c_uint64),  # zone_append_lba for zoned appends
    ]


class ublk_param_basic(ctypes.Structure):
    """Sizes and limits of the block device (32 bytes)."""

    _fields_ = [
        ("attrs", ctypes.c_uint32),
        ("logical_bs_shift", ctypes.c_uint8),
        ("physical_bs_shift", ctypes.c_uint8),
        ("io_opt_shift", ctypes.c_uint8),
        ("io_min_shift", ctypes.c_uint8),
        ("max_sectors", ctypes.c_uint32),
        ("chunk_sectors", ctypes.c_uint32),
        ("dev_sectors", ctypes.c_uint64),
        ("virt_boundary_mask", ctypes.c_uint64),
    ]


class ublk_param_discard(ctypes.Structure):
    """Discard / write-zeroes limits (20 bytes)."""

    _fields_ = [
        ("discard_alignment", ctypes.c_uint32),
        ("discard_granularity", ctypes.c_uint32),
        ("max_discard_sectors", ctypes.c_uint32),
        ("max_write_zeroes_sectors", ctypes.c_uint32),
        ("max_discard_segments", ctypes.c_uint16),  # the driver accepts only 1
        ("reserved0", ctypes.c_uint16),
    ]


class ublk_param_devt(ctypes.Structure):
    """Read-only device numbers filled in by GET_PARAMS (6.2+, 16 bytes)."""

    _fields_ = [
        ("char_major", ctypes.c_uint32),
        ("char_minor", ctypes.c_uint32),
        ("disk_major", ctypes.c_uint32),  # 0 until START_DEV
        ("disk_minor", ctypes.c_uint32),
    ]


class ublk_param_zoned(ctypes.Structure):
    """Zoned device limits (6.6+, 32 bytes; ublksrv's copy differs)."""

    _fields_ = [
        ("max_open_zones", ctypes.c_uint32),
        ("max_active_zones", ctypes.c_uint32),
        ("max_zone_append_sectors", ctypes.c_uint32),
        ("reserved", ctypes.c_uint8 * 20),
    ]


class ublk_params(ctypes.Structure):
    """SET_PARAMS / GET_PARAMS buffer: 112 bytes on 6.12 (64 on 6.1).

    ``len`` tells the kernel how much of it we pass; a kernel with a
    shorter struct uses only its own part, so sending the 6.12 size to
    6.1 is fine.
    """

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("types", ctypes.c_uint32),  # UBLK_PARAM_TYPE_* present
        ("basic", ublk_param_basic),
        ("discard", ublk_param_discard),
        ("devt", ublk_param_devt),
        ("zoned", ublk_param_zoned),
    ]


CTRL_CMD_SIZE = ctypes.sizeof(ublksrv_ctrl_cmd)  # 32
IO_CMD_SIZE = ctypes.sizeof(ublksrv_io_cmd)  # 16
IO_DESC_SIZE = ctypes.sizeof(ublksrv_io_desc)  # 24

# --- control commands (to /dev/ublk-control) --------------------------------
# Legacy numbers: what 6.1 understands.  6.4+ switches on _IOC_NR() and
# takes the legacy form only with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=y
# (Debian's 6.12: y).

UBLK_CMD_GET_QUEUE_AFFINITY = 0x01
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_GET_PARAMS = 0x09
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_GET_DEV_INFO2 = 0x12  # 6.3+

UBLK_U_CMD_GET_QUEUE_AFFINITY = _ior(UBLK_CMD_GET_QUEUE_AFFINITY, CTRL_CMD_SIZE)
UBLK_U_CMD_GET_DEV_INFO = _ior(UBLK_CMD_GET_DEV_INFO, CTRL_CMD_SIZE)
UBLK_U_CMD_ADD_DEV = _iowr(UBLK_CMD_ADD_DEV, CTRL_CMD_SIZE)
UBLK_U_CMD_DEL_DEV = _iowr(UBLK_CMD_DEL_DEV, CTRL_CMD_SIZE)
UBLK_U_CMD_START_DEV = _iowr(UBLK_CMD_START_DEV, CTRL_CMD_SIZE)
UBLK_U_CMD_STOP_DEV = _iowr(UBLK_CMD_STOP_DEV, CTRL_CMD_SIZE)
UBLK_U_CMD_SET_PARAMS = _iowr(UBLK_CMD_SET_PARAMS, CTRL_CMD_SIZE)
UBLK_U_CMD_GET_PARAMS = _ior(UBLK_CMD_GET_PARAMS, CTRL_CMD_SIZE)
UBLK_U_CMD_START_USER_RECOVERY = _iowr(UBLK_CMD_START_USER_RECOVERY, CTRL_CMD_SIZE)
UBLK_U_CMD_END_USER_RECOVERY = _iowr(UBLK_CMD_END_USER_RECOVERY, CTRL_CMD_SIZE)
UBLK_U_CMD_GET_DEV_INFO2 = _ior(UBLK_CMD_GET_DEV_INFO2, CTRL_CMD_SIZE)
# Only in ioctl form; a kernel without it answers -EOPNOTSUPP (6.4) or
# -EINVAL/-EOPNOTSUPP (6.1, which knows no 'u' opcodes at all).
UBLK_U_CMD_GET_FEATURES = _ior(0x13, CTRL_CMD_SIZE)  # 6.5+
UBLK_U_CMD_DEL_DEV_ASYNC = _ior(0x14, CTRL_CMD_SIZE)  # 6.9+
# 6.16+, on a device created with UBLK_F_QUIESCE; data[0]: timeout in ms.
UBLK_U_CMD_QUIESCE_DEV = _iowr(0x16, CTRL_CMD_SIZE)

UBLK_FEATURES_LEN = 8  # GET_FEATURES writes one u64

# --- IO commands (to /dev/ublkcN) ------------------------------------------

UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
UBLK_IO_NEED_GET_DATA = 0x22

UBLK_U_IO_FETCH_REQ = _iowr(UBLK_IO_FETCH_REQ, IO_CMD_SIZE)
UBLK_U_IO_COMMIT_AND_FETCH_REQ = _iowr(UBLK_IO_COMMIT_AND_FETCH_REQ, IO_CMD_SIZE)
UBLK_U_IO_NEED_GET_DATA = _iowr(UBLK_IO_NEED_GET_DATA, IO_CMD_SIZE)

# CQE res of an IO command.  ABORT: the queue is going away, stop
# fetching that tag.
UBLK_IO_RES_OK = 0
UBLK_IO_RES_NEED_GET_DATA = 1
UBLK_IO_RES_ABORT = -errno.ENODEV

# --- feature flags (ADD_DEV info.flags, GET_FEATURES) -----------------------

UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
UBLK_F_NEED_GET_DATA = 1 << 2
UBLK_F_USER_RECOVERY = 1 << 3  # 6.1
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4  # 6.1
UBLK_F_UNPRIVILEGED_DEV = 1 << 5  # 6.3
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6  # 6.4
UBLK_F_USER_COPY = 1 << 7  # 6.5
UBLK_F_ZONED = 1 << 8  # 6.6
UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9  # 6.13: not on the test bed's 6.12
UBLK_F_UPDATE_SIZE = 1 << 10  # 6.16
UBLK_F_AUTO_BUF_REG = 1 << 11  # 6.16
UBLK_F_QUIESCE = 1 << 12  # 6.16
UBLK_F_PER_IO_DAEMON = 1 << 13  # 6.16
UBLK_F_BUF_REG_OFF_DAEMON = 1 << 14  # 6.17


@dataclass(frozen=True)
class Feature:
    """A UBLK_F_* bit as `ublkd features` explains it."""

    bit: int
    name: str
    since: str  # the first mainline kernel with it
    meaning: str


FEATURES = (
    Feature(UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY", "6.15",
            "request pages can be registered as io_uring buffers (zero copy)"),
    Feature(UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK", "6.0",
            "requests are handed to the server from task context"),
    Feature(UBLK_F_NEED_GET_DATA, "NEED_GET_DATA", "6.0",
            "the server lends a buffer per write before the data is copied"),
    Feature(UBLK_F_USER_RECOVERY, "USER_RECOVERY", "6.1",
            "a device outlives its server; a new one recovers it (ublkd needs it)"),
    Feature(UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE", "6.1",
            "requests in flight when the server died are sent again: recovery = reissue"),
    Feature(UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV", "6.3",
            "devices an unprivileged user may create (not used by ublkd)"),
    Feature(UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE", "6.4",
            "commands in ioctl encoding (ublkd uses it where present)"),
    Feature(UBLK_F_USER_COPY, "USER_COPY", "6.5",
            "the server copies request data with pread/pwrite on /dev/ublkcN"),
    Feature(UBLK_F_ZONED, "ZONED", "6.6", "zoned block devices (not used by ublkd)"),
    Feature(UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO", "6.13",
            "while no server runs, I/O fails at once; the device stays: recovery = fail_io"),
    Feature(UBLK_F_UPDATE_SIZE, "UPDATE_SIZE", "6.16",
            "the size of a running device can change (not used by ublkd)"),
    Feature(UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG", "6.16",
            "each request's pages are registered as an io_uring buffer by the kernel: "
            "the file backend's zero copy"),
    Feature(UBLK_F_QUIESCE, "QUIESCE", "6.16",
            "QUIESCE_DEV stops a device between requests: `ublkd upgrade` hands over "
            "with nothing in flight"),
    Feature(UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON", "6.16",
            "any server thread may serve any tag of a queue (not used by ublkd)"),
    Feature(UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON", "6.17",
            "request buffers may be registered from any thread (not used by ublkd)"),
)
FEATURE_NAMES = {feature.bit: feature.name for feature in FEATURES}


def feature_names(flags: int) -> list[str]:
    """Names of the UBLK_F_* bits in flags (unknown bits as hex), for logs."""
    names = [name for bit, name in FEATURE_NAMES.items() if flags & bit]
    unknown = flags & ~sum(FEATURE_NAMES)
    if unknown:
        names.append(hex(unknown))
    return names


# --- device states ------------------------------------------------------------

UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2
UBLK_S_DEV_FAIL_IO = 3  # 6.13+

STATE_NAMES = {
    UBLK_S_DEV_DEAD: "DEAD",
    UBLK_S_DEV_LIVE: "LIVE",
    UBLK_S_DEV_QUIESCED: "QUIESCED",
    UBLK_S_DEV_FAIL_IO: "FAIL_IO",
}

# --- request ops and flags in ublksrv_io_desc.op_flags ----------------------

UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_SAME = 4  # defined, never sent by the driver
UBLK_IO_OP_WRITE_ZEROES = 5
UBLK_IO_OP_ZONE_OPEN = 10
UBLK_IO_OP_ZONE_CLOSE = 11
UBLK_IO_OP_ZONE_FINISH = 12
UBLK_IO_OP_ZONE_APPEND = 13
UBLK_IO_OP_ZONE_RESET_ALL = 14
UBLK_IO_OP_ZONE_RESET = 15
UBLK_IO_OP_REPORT_ZONES = 18

UBLK_IO_OP_MASK = 0xFF

UBLK_IO_F_FAILFAST_DEV = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
UBLK_IO_F_META = 1 << 11
UBLK_IO_F_FUA = 1 << 13
UBLK_IO_F_NOUNMAP = 1 << 15
UBLK_IO_F_SWAP = 1 << 16

# --- params -------------------------------------------------------------------

UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3

UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1
UBLK_PARAM_TYPE_DEVT = 1 << 2  # read-only: SET_PARAMS with it is -EINVAL
UBLK_PARAM_TYPE_ZONED = 1 << 3

# --- limits and the descriptor mmap ---------------------------------------

UBLK_MAX_QUEUE_DEPTH = 4096
UBLK_QID_BITS = 12
UBLK_MAX_NR_QUEUES = 1 << UBLK_QID_BITS  # 6.5+ header; 6.1 had no constant

UBLKSRV_CMD_BUF_OFFSET = 0
UBLKSRV_IO_BUF_OFFSET = 0x80000000  # USER_COPY pread/pwrite positions

PAGE_SIZE = mmap.PAGESIZE


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def descriptor_length(queue_depth: int) -> int:
    """Bytes to mmap for one queue's descriptors: the kernel wants exactly this."""
    return _round_up(queue_depth * IO_DESC_SIZE, PAGE_SIZE)


def descriptor_offset(q_id: int) -> int:
    """mmap offset of queue q_id's descriptors on /dev/ublkcN.

    Every queue gets a slot sized for the maximum depth, whatever the
    device's real depth.
    """
    return UBLKSRV_CMD_BUF_OFFSET + q_id * descriptor_length(UBLK_MAX_QUEUE_DEPTH)


# --- which opcode numbers to send -------------------------------------------


@dataclass(frozen=True)
class Opcodes:
    """The cmd_op numbers of every command in one encoding.

    Pick one set per process (see ``opcodes``) so control and IO commands
    agree; GET_FEATURES exists in ioctl form only and is the same in both.
    """

    get_queue_affinity: int
    get_dev_info: int
    add_dev: int
    del_dev: int
    start_dev: int
    stop_dev: int
    set_params: int
    get_params: int
    start_user_recovery: int
    end_user_recovery: int
    get_dev_info2: int
    fetch_req: int
    commit_and_fetch_req: int
    need_get_data: int
    get_features: int = UBLK_U_CMD_GET_FEATURES
    del_dev_async: int | None = None  # 6.9+, in ioctl form only


LEGACY_OPCODES = Opcodes(
    get_queue_affinity=UBLK_CMD_GET_QUEUE_AFFINITY,
    get_dev_info=UBLK_CMD_GET_DEV_INFO,
    add_dev=UBLK_CMD_ADD_DEV,
    del_dev=UBLK_CMD_DEL_DEV,
    start_dev=UBLK_CMD_START_DEV,
    stop_dev=UBLK_CMD_STOP_DEV,
    set_params=UBLK_CMD_SET_PARAMS,
    get_params=UBLK_CMD_GET_PARAMS,
    start_user_recovery=UBLK_CMD_START_USER_RECOVERY,
    end_user_recovery=UBLK_CMD_END_USER_RECOVERY,
    get_dev_info2=UBLK_CMD_GET_DEV_INFO2,
    fetch_req=UBLK_IO_FETCH_REQ,
    commit_and_fetch_req=UBLK_IO_COMMIT_AND_FETCH_REQ,
    need_get_data=UBLK_IO_NEED_GET_DATA,
)

IOCTL_OPCODES = Opcodes(
    get_queue_affinity=UBLK_U_CMD_GET_QUEUE_AFFINITY,
    get_dev_info=UBLK_U_CMD_GET_DEV_INFO,
    add_dev=UBLK_U_CMD_ADD_DEV,
    del_dev=UBLK_U_CMD_DEL_DEV,
    start_dev=UBLK_U_CMD_START_DEV,
    stop_dev=UBLK_U_CMD_STOP_DEV,
    set_params=UBLK_U_CMD_SET_PARAMS,
    get_params=UBLK_U_CMD_GET_PARAMS,
    start_user_recovery=UBLK_U_CMD_START_USER_RECOVERY,
    end_user_recovery=UBLK_U_CMD_END_USER_RECOVERY,
    get_dev_info2=UBLK_U_CMD_GET_DEV_INFO2,
    fetch_req=UBLK_U_IO_FETCH_REQ,
    commit_and_fetch_req=UBLK_U_IO_COMMIT_AND_FETCH_REQ,
    need_get_data=UBLK_U_IO_NEED_GET_DATA,
    del_dev_async=UBLK_U_CMD_DEL_DEV_ASYNC,
)


def opcodes(ioctl_encode: bool) -> Opcodes:
    """The opcode set for a kernel that does (True) or doesn't take ioctl encoding."""
    return IOCTL_OPCODES if ioctl_encode else LEGACY_OPCODES


def io_opcodes(ioctl_encode: bool) -> tuple[int, int]:
    """(FETCH_REQ, COMMIT_AND_FETCH_REQ) in the chosen encoding: the queue's hot pair."""
    ops = opcodes(ioctl_encode)
    return ops.fetch_req, ops.commit_and_fetch_req
