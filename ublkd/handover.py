"""Whether a device survives being handed over to a new daemon (`ublkd upgrade`).

A hand-over is a planned exit of the serving daemon: it finishes its
backend I/O, exits, and its successor recovers the device.  What the
kernel does with the device in between depends on the recovery flags the
device was created with, which GET_DEV_INFO reports; the config file may
have been edited since and says nothing about the device that exists:

    recovery   kernel flags                 while no daemon runs (6.12)
    reissue    USER_RECOVERY + REISSUE      requests wait; those the daemon held
                                            are re-issued: nobody sees anything
    abort      USER_RECOVERY                requests wait, but those the daemon
                                            held fail with EIO
    fail_io    USER_RECOVERY + FAIL_IO      every request fails with EIO at once
               (6.13+)                      (state FAIL_IO); the device stays
    none       neither                      the device is stopped, its disk
                                            removed (ublk_nosrv_should_stop_dev);
                                            the successor creates a new one

Only "reissue" is handed over, and "abort" where the device was made with
UBLK_F_QUIESCE (6.16+): its daemon quiesces it first (QUIESCE_DEV), so it
holds no request when it exits and none fails.  "none" would take the
device from under its mount.  "abort" without quiesce, and "fail_io"
(which fails the I/O of the gap, quiesced or not), would turn a routine
package upgrade into I/O errors, which a file system (errors=remount-ro)
or an md array (the member is failed) takes as a broken disk; whoever
chose them wants errors for real faults, not for upgrades (docs/design.md,
"Upgrades").
"""

from __future__ import annotations

import contextlib

from ublkd import identity
from ublkd.errors import DeviceNotFoundError, HandOverRefusedError
from ublkd.kernel import uapi
from ublkd.kernel.control import ControlDevice, DeviceInfo
from ublkd.state import DeviceState

# The kernel flags of each `recovery` mode of the config.
RECOVERY_FLAGS = {
    "reissue": uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE,
    "abort": uapi.UBLK_F_USER_RECOVERY,
    "fail_io": uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_FAIL_IO,
    "none": 0,
}
RECOVERY_BITS = (uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
                 | uapi.UBLK_F_USER_RECOVERY_FAIL_IO)

# What a device of each mode would suffer from its daemon's exit.
LOSSES = {
    "abort": "the kernel fails the requests its daemon holds with EIO when that daemon "
             "exits, and a file system or RAID on it takes that as a broken disk",
    "fail_io": "the kernel fails every request with EIO while no daemon serves it, and a "
               "file system or RAID on it takes that as a broken disk",
    "none": "the kernel removes its disk as soon as its daemon exits: mounted file systems "
            "would lose it, with the data they had not written yet",
}


def recovery_mode(flags: int) -> str | None:
    """The config's name of the recovery mode in a device's kernel flags; None
    for a combination ublkd never creates (another server's device)."""
    bits = flags & RECOVERY_BITS
    return next((mode for mode, wanted in RECOVERY_FLAGS.items() if wanted == bits), None)


def hand_over_loss(flags: int) -> str | None:
    """What a device with these kernel flags would suffer from a hand-over, or None."""
    mode = recovery_mode(flags)
    if mode == "reissue" or (mode == "abort" and flags & uapi.UBLK_F_QUIESCE):
        return None
    return LOSSES.get(mode, f"its recovery flags {flags & RECOVERY_BITS:#x} are not ublkd's, "
                            "and only \"reissue\" survives a hand-over")


def refuse_if_lost(name: str, state: DeviceState) -> DeviceInfo:
    """Device `name`'s kernel device, if it survives a hand-over; else
    HandOverRefusedError, saying what it would lose and when it moves to the
    new version instead.  Nothing is sent to the daemon or the device."""
    with contextlib.closing(ControlDevice()) as control:
        info = identity.find_device(control, name, state, None)
    if info is None:
        raise DeviceNotFoundError(f"{name}: the kernel has no device for it (its state file "
                                  f"names /dev/ublkb{state.dev_id}); nothing to hand over")
    loss = hand_over_loss(info.flags)
    if loss is None:
        return info
    mode = recovery_mode(info.flags)
    created = f'recovery = "{mode}"' if mode else f"kernel flags {info.flags:#x}"
    raise HandOverRefusedError(
        f"{name}: not handed over: /dev/ublkb{info.dev_id} was created with {created}, and "
        f"{loss}. It stays with ublkd {state.version} (pid {info.pid}) until its next "
        f"planned restart (`systemctl restart ublkd@{name}` once its users are stopped); "
        f"recovery = \"reissue\" in {state.config['source']} makes the device created then "
        f"one that upgrades can hand over")
