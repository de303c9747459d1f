"""The test bed: a real ublk kernel and systemd as PID 1, under qemu.

See docs/testbed.md.  `python -m tests.testbed --help` boots it by hand.
"""

from .guest import Guest, GuestBootError, GuestCommandError, GuestConfig, GuestError, Result
from .provision import KernelBuild, ProvisionError, prepare

__all__ = [
    "Guest",
    "GuestBootError",
    "GuestCommandError",
    "GuestConfig",
    "GuestError",
    "KernelBuild",
    "ProvisionError",
    "Result",
    "prepare",
]
