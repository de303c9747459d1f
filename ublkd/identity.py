"""Which of the kernel's ublk devices is device NAME's: the kernel keeps our cookie.

ADD_DEV stores `ublksrv_ctrl_dev_info.ublksrv_flags` as given (the driver
never reads it) and GET_DEV_INFO returns it for as long as the device
exists.  ublkd puts a cookie made from the device's name there, so the
kernel itself says which device is NAME's.  Two things follow:

- A state file that is corrupt, unreadable or lost does not lose the
  device, and so never leaves it with no daemon and its I/O hanging:
  `serve` rebuilds what it needs from the kernel (GET_DEV_INFO,
  GET_PARAMS) and the config; `give-up` and `delete` find the device.
- A stale state file (an unclean shutdown, then another device got the
  same id) never makes ublkd serve, recover or delete another device.

Devices created by ublkd 0.1 carry no cookie (0).  For those the state
file is the only record, and it counts only where the kernel agrees with
it (flags, size, block size); without a state file, a config that pins
`id` names one.  Anything else would be a guess, and ublkd never serves
a device from a guess.
"""

from __future__ import annotations

import logging
import os

from ublkd.errors import DeviceNotFoundError
from ublkd.kernel.control import ControlDevice, DeviceInfo, Params, device_ids
from ublkd.state import DeviceState

log = logging.getLogger(__name__)

COOKIE_TAG = 0x75B1 << 48  # the high 16 bits say "made by ublkd"
TAG_MASK = 0xFFFF << 48
LOW_48 = (1 << 48) - 1
FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3


def cookie_of(name: str) -> int:
    """The cookie of device `name`: the tag and 48 bits of a hash of the name.

    The hash is 64-bit FNV-1a folded to 48 bits: the same on every machine
    and Python version, and computed without hashlib, whose import (it
    loads OpenSSL) was 40 ms of every recovery's start in the test bed's
    guest.  A fingerprint, not a secret: only root can create devices.
    """
    value = FNV64_OFFSET
    for byte in name.encode():
        value = ((value ^ byte) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return COOKIE_TAG | ((value >> 48) ^ (value & LOW_48))


def find_device(control: ControlDevice, name: str, state: DeviceState | None,
                pinned_id: int | None) -> DeviceInfo | None:
    """Device `name`'s kernel device, or None when it has none.

    In this order: the state file's device if the kernel agrees it is
    ours; the device carrying our cookie; with no state file, the
    cookie-less device at the id the config pins, if its server is gone.
    """
    if state is not None:
        info = info_or_none(control, state.dev_id)
        if info is not None and belongs_to(control, info, name, state):
            return info
        if info is not None:
            log.warning("%s: /dev/ublkb%d, named by the state file, is another device now "
                        "(cookie %#x); leaving it alone", name, info.dev_id, info.cookie)
    cookie = cookie_of(name)
    for dev_id in device_ids():
        info = info_or_none(control, dev_id)
        if info is not None and info.cookie == cookie:
            return info
    if state is None and pinned_id is not None:
        info = info_or_none(control, pinned_id)
        if info is not None and info.cookie == 0 and not process_exists(info.pid):
            return info
    return None


def process_exists(pid: int) -> bool:
    """Whether `pid` is a running process: a cookie-less device whose server
    still runs is another server's, even at the id our config pins."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    return True


def belongs_to(control: ControlDevice, info: DeviceInfo, name: str,
               state: DeviceState) -> bool:
    """Whether the kernel's device `info` is the one `state` describes."""
    if info.cookie:
        return info.cookie == cookie_of(name)
    if info.dev_id != state.dev_id:
        return False
    kernel = control.get_params(info.dev_id)
    recorded = Params.from_dict(state.params)
    return (info.flags == state.flags and kernel.dev_sectors == recorded.dev_sectors
            and kernel.logical_block_size == recorded.logical_block_size)


def cookieless_devices(control: ControlDevice) -> list[int]:
    """Ids of devices that carry no cookie (ublkd 0.1's, or another server's):
    what an admin must look at when a device cannot be identified."""
    return [dev_id for dev_id in device_ids()
            if (info := info_or_none(control, dev_id)) is not None and info.cookie == 0]


def info_or_none(control: ControlDevice, dev_id: int) -> DeviceInfo | None:
    """GET_DEV_INFO, None when the device does not exist (or went away meanwhile)."""
    try:
        return control.get_info(dev_id)
    except DeviceNotFoundError:
        return None
