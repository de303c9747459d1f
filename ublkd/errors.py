"""ublkd's errors: one class for each kind of problem a user can fix, with its exit code.

The message is all the user gets to see, so it names the device, the file
and the fix. The CLI is the only place that turns these errors into exit
codes: it prints str(error) and exits with error.exit_code. Any other
exception is a bug in ublkd and exits with 1.

    code  error                   meaning
    ----  ----------------------  ----------------------------------------------
    0     -                       success
    1     any other exception     unexpected internal error (a bug: report it)
    2     ConfigError             bad or missing config file, key, value or name
    2     StateError              state file is corrupt or from another ublkd
    3     DriverNotLoadedError    no /dev/ublk-control: run `modprobe ublk_drv`
    3     NotRootError            needs root (CAP_SYS_ADMIN)
    4     KernelError             the kernel rejected a control command
    5     DeviceBusyError         the device or id is in use
    6     BackendError            the backing file cannot be opened or used
    7     DeviceNotFoundError     the kernel has no such device
    8     MissingDependencyError  an optional Python package is not installed
    9     HandOverRefusedError    `upgrade`: the device would not survive a hand-over

Code 2 is also what argparse uses for a bad command line, so 2 always means
"fix what you wrote". DeviceNotFoundError has its own code so that scripts
can tell "already gone" apart from "the kernel refused".  MissingDependencyError
has its own code because neither the command line nor the device is at
fault: installing a package fixes it.  HandOverRefusedError has its own
code because it is not a failure: the device stays, served by the daemon
it has, and the package's postinst tells such devices apart from failed
hand-overs.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1


class UblkdError(Exception):
    """Base of every error a user can act on; str(error) is the message."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ConfigError(UblkdError):
    """The config file, one of its keys or values, or a device name is wrong, or the
    file is one that another user could change."""

    exit_code = 2


class StateError(UblkdError):
    """A state file is corrupt, unwritable, or written by another ublkd version."""

    exit_code = 2


class CorruptStateError(StateError):
    """A state file that cannot be read or parsed: the daemon rebuilds what it
    needs from the kernel's device instead (ublkd/identity.py), when it can
    tell which device is this one's."""


class DriverNotLoadedError(UblkdError):
    """/dev/ublk-control is missing; the message tells to run `modprobe ublk_drv`."""

    exit_code = 3


class NotRootError(UblkdError):
    """The command needs root (CAP_SYS_ADMIN), which every ublk control command requires."""

    exit_code = 3


class KernelError(UblkdError):
    """A control command failed; the message names the command, the device and the errno."""

    exit_code = 4


class DeviceBusyError(UblkdError):
    """The device or the id is in use: the id is taken, or a live daemon serves the device."""

    exit_code = 5


class BackendError(UblkdError):
    """The backing file cannot be used: missing without a size, too small, or of the wrong kind."""

    exit_code = 6


class DeviceNotFoundError(UblkdError):
    """The kernel has no such device."""

    exit_code = 7


class MissingDependencyError(UblkdError):
    """An optional dependency of one command is missing (pystemd for `ublkd upgrade`,
    the extra "systemd" of a pip install); the message names the package to install."""

    exit_code = 8


class HandOverRefusedError(UblkdError):
    """`ublkd upgrade` of a device whose recovery mode does not survive its daemon's
    exit ("none": the kernel deletes it; "abort": its held I/O fails): the
    device stays with the daemon serving it, until a planned restart."""

    exit_code = 9
