"""The `ublkd` command.  Errors become exit codes here and nowhere else."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ublkd import __version__, daemon, handover, inventory, succession, systemd
from ublkd.config import load_config, validate_name
from ublkd.errors import EXIT_INTERNAL, DeviceNotFoundError, UblkdError
from ublkd.kernel import uapi
from ublkd.kernel.control import ControlDevice
from ublkd.state import load_state
from ublkd.supervisor import Supervisor
from ublkd.systemd import setup_logging

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

DESCRIPTION = """\
ublkd serves Linux ublk block devices (/dev/ublkbN) from user space, one
device per configuration file, and can pick a device up again after its
daemon died: with recovery enabled, the kernel keeps the device and queues
its I/O while no daemon runs.

Normally systemd runs it: `systemctl start ublkd@NAME` runs `ublkd serve
NAME`, which reads /etc/ublkd/NAME.toml.
"""

EPILOG = """\
files:
  /etc/ublkd/NAME.toml      configuration of device NAME (see ublkd.toml(5)
                            and conf/vol0.toml.example); read only if it and
                            every directory above it are root's and not
                            writable by group or others
  /var/lib/ublkd/NAME.json  state of device NAME while it exists: kernel id,
                            flags, parameters, daemon pid (directory mode 0700)
  /dev/ublk-control         the driver's control device (modprobe ublk_drv)
  /dev/ublkbN, /dev/ublkcN  the block device and its server's char device

environment:
  UBLKD_CONF_DIR            read configurations here instead of /etc/ublkd
  UBLKD_STATE_DIR           keep state files here instead of /var/lib/ublkd

exit status:
  0  success
  1  unexpected internal error (a bug: please report it, with the log)
  2  bad command line, configuration, device name, or state file
  3  the ublk driver is not loaded, or not running as root
  4  the kernel refused a control command
  5  the device or its id is in use
  6  the backing file cannot be used
  7  no such device
  8  an optional Python package is missing (the message names it)
  9  upgrade refused: the device's recovery mode ("none", "fail_io", "abort"
     without quiesce) would not survive a hand-over; it stays with its daemon
     until a planned restart

examples:
  ublkd serve vol0          serve /etc/ublkd/vol0.toml in the foreground
  ublkd list                every ublk device and every device ublkd knows
  ublkd status vol0 --json  one device, as JSON
  ublkd delete vol0         remove vol0's device after its daemon is gone
  ublkd upgrade vol0        hand vol0 over to the ublkd installed now
  ublkd recover vol0        start recovering vol0 by hand (see also
                            ublkd-recover@vol0.service)

see also:
  systemctl status ublkd@NAME, journalctl -u ublkd@NAME, ublkd.toml(5)
"""


def build_parser() -> argparse.ArgumentParser:
    import argparse  # here: the unit's `serve NAME` goes without it (is_unit_serve)

    parser = argparse.ArgumentParser(
        prog="ublkd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ublkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="create the device NAME and serve it until SIGTERM/SIGINT",
        description="Create the ublk device described by /etc/ublkd/NAME.toml and serve it "
                    "in the foreground. SIGTERM or SIGINT stops the device, deletes it and "
                    "removes its state file. A failed start leaves nothing behind.")
    serve.add_argument("name", metavar="NAME")
    serve.set_defaults(func=cmd_serve)

    listing = commands.add_parser(
        "list", help="list ublk devices and the devices ublkd knows",
        description="List every ublk device the kernel has and every state file: name, "
                    "id, block device, kernel state (LIVE, QUIESCED, DEAD, or 'gone' when "
                    "a state file names a device that no longer exists), server pid, "
                    "backend. A device whose state file is lost or corrupt is named after "
                    "the configuration whose cookie it carries.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)

    status = commands.add_parser("status", help="show one device",
                                 description="Show device NAME: state file and kernel view.")
    status.add_argument("name", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    delete = commands.add_parser(
        "delete", help="remove a device whose daemon is gone, and its state",
        description="Remove device NAME (STOP_DEV, DEL_DEV) and its state file. Refuses "
                    "while a ublkd process serves it: stop that with `systemctl stop "
                    "ublkd@NAME`. Queued I/O of a device waiting for recovery fails. The "
                    "device is found even when its state file is corrupt or lost: the "
                    "kernel keeps a cookie of its name. --id N removes /dev/ublkbN "
                    "whoever made it, for a device no name can be found for.")
    target = delete.add_mutually_exclusive_group(required=True)
    target.add_argument("name", metavar="NAME", nargs="?")
    target.add_argument("--id", type=int, metavar="N", dest="dev_id",
                        help="the device /dev/ublkbN instead of a name")
    delete.set_defaults(func=cmd_delete)

    upgrade = commands.add_parser(
        "upgrade", help="hand a running device over to a new ublkd process",
        description="Make the daemon of ublkd@NAME hand its device over to a new process "
                    "started from the ublkd installed now (the package's postinst runs "
                    "this after an upgrade): the daemon quiesces the device where the "
                    "kernel can (UBLK_F_QUIESCE, 6.16+), finishes its backend I/O in "
                    "flight and exits; systemd starts the new one, which recovers the "
                    "device. With recovery = \"reissue\" applications see no error; the "
                    "device, its number and its mounts stay. Waits until the new daemon "
                    "is ready. Refuses (exit 9) a device created with recovery = \"none\" "
                    "(the kernel would remove it), \"fail_io\" (its I/O would fail until "
                    "the new daemon serves it) or \"abort\" without quiesce (its held I/O "
                    "would fail), as the kernel's flags for it say, whatever its config "
                    "says now.")
    upgrade.add_argument("name", metavar="NAME")
    upgrade.set_defaults(func=cmd_upgrade)

    recover = commands.add_parser(
        "recover", help="start the recovery of a device whose daemon died",
        description="Send START_USER_RECOVERY for device NAME, retrying for up to 30 s "
                    "while the kernel still sees the old daemon (its /dev/ublkcN open, the "
                    "device not yet quiesced). `ublkd serve NAME` then finishes the "
                    "recovery. Not needed under systemd: ublkd@NAME recovers by itself "
                    "when it is restarted; ublkd-recover@NAME.service runs this and "
                    "restarts ublkd@NAME after systemd gave up.")
    recover.add_argument("name", metavar="NAME")
    recover.set_defaults(func=cmd_recover)

    give_up = commands.add_parser(
        "give-up", help="apply on_give_up after systemd stopped restarting NAME",
        description="Run by ublkd-giveup@NAME.service (OnFailure= of ublkd@NAME) when "
                    "systemd stopped restarting a crash-looping daemon: with on_give_up = "
                    "\"delete\" the device is deleted and its queued I/O fails; with "
                    "\"keep\" it stays, its I/O waiting, for a manual recovery.")
    give_up.add_argument("--delete", action="store_true",
                         help="delete the device whatever on_give_up says, unless a daemon "
                              "serves it again (ExecStop= of ublkd-giveup@NAME)")
    give_up.add_argument("name", metavar="NAME")
    give_up.set_defaults(func=cmd_give_up)

    stop_post = commands.add_parser(
        "stop-post", help="after ublkd@NAME stopped: delete a device left without daemon",
        description="Run by ExecStopPost= of ublkd@NAME with systemd's $SERVICE_RESULT, "
                    "$EXIT_CODE and $EXIT_STATUS. After a stop (not a crash, a hand-over "
                    "or the stop half of a restart) that landed before the daemon served "
                    "the device, for example while a restarted daemon was still "
                    "recovering it, the device is deleted, so that its queued I/O fails "
                    "instead of waiting forever. Does nothing when the daemon stopped the "
                    "device itself, as it normally does.")
    stop_post.add_argument("name", metavar="NAME")
    stop_post.set_defaults(func=cmd_stop_post)

    features = commands.add_parser("features", help="what the kernel's ublk driver supports",
                                   description="Print the UBLK_F_* features of the running "
                                               "kernel's ublk driver (GET_FEATURES).")
    features.add_argument("--json", action="store_true", help="print JSON")
    features.set_defaults(func=cmd_features)

    bus = commands.add_parser(
        "dbus", help="serve the D-Bus API org.ublkd1 on the system bus",
        description="Publish ublkd's devices on the system bus as org.ublkd1 (see ublkd(8), "
                    "\"D-BUS API\") until SIGTERM. Normally the bus starts it when a client "
                    "first calls org.ublkd1 (ublkd-dbus.service); it holds no state of its "
                    "own, so stopping or killing it touches no device.")
    bus.set_defaults(func=cmd_dbus)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if is_unit_serve(argv):
        setup_logging(verbose=False)
        return exit_code_of(serve, argv[1])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return exit_code_of(args.func, args)


def is_unit_serve(argv: list[str]) -> bool:
    """`ublkd serve NAME` as the unit runs it, which needs no parser.

    Every recovery of a killed unit waits for this start, and importing
    argparse and building the parser were 0.12 s of it in the test bed's
    guest (docs/performance.md).  Anything else, an option or `-h`
    included, goes through the parser; both ways end in `serve`.
    """
    return len(argv) == 2 and argv[0] == "serve" and not argv[1].startswith("-")


def exit_code_of(func: Callable[..., int | None], *args) -> int:
    """Run a command (or a serving worker) and map what it raised to an exit code."""
    try:
        return func(*args) or 0
    except UblkdError as error:
        log.error("%s", error)
        return error.exit_code
    except Exception:
        log.exception("internal error; please report it with this log")
        return EXIT_INTERNAL


# -- commands ------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    return serve(args.name)


def serve(name: str) -> int:
    # First: it sets WATCHDOG_PID to this process, which the Notifier reads.
    predecessor = succession.predecessor_from_environment()
    config, config_error = daemon.config_for_serving(validate_name(name))
    notifier = systemd.Notifier()
    return Supervisor(config.name,
                      lambda first: exit_code_of(daemon.serve, config, notifier, config_error,
                                                 first),
                      notifier.status, predecessor).run()


def cmd_upgrade(args: argparse.Namespace) -> int:
    name = validate_name(args.name)
    daemon.require_root()
    systemd.systemd1(f"ublkd@{name}.service")  # without pystemd, say so before anything else
    before = load_state(name)
    if before is None:
        raise DeviceNotFoundError(f"{name}: ublkd has no state for it; nothing to hand over")
    handover.refuse_if_lost(name, before)
    systemd.hand_over(f"ublkd@{name}.service")
    state = load_state(name)
    print(f"{name}: /dev/ublkb{state.dev_id} handed over from pid {before.pid} to pid "
          f"{state.pid} (ublkd {state.version})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    daemon.require_root()
    with contextlib.closing(ControlDevice()) as control:
        rows = inventory.device_rows(control)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(list_table(rows), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    name = validate_name(args.name)
    daemon.require_root()
    with contextlib.closing(ControlDevice()) as control:
        rows = [row for row in inventory.device_rows(control) if row["name"] == name]
    if not rows:
        raise DeviceNotFoundError(f"{name}: ublkd has no state for it (not started?)")
    row = rows[0]
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        for key, value in row.items():
            print(f"{key + ':':10} {value if value is not None else '-'}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    name = None if args.name is None else validate_name(args.name)
    print(daemon.delete(name, args.dev_id))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    config = load_config(validate_name(args.name))
    dev_id = daemon.recover(config)
    print(f"{config.name}: recovery of /dev/ublkb{dev_id} started; `ublkd serve "
          f"{config.name}` (or `systemctl start ublkd@{config.name}`) finishes it")
    return 0


def cmd_give_up(args: argparse.Namespace) -> int:
    log.warning("%s", daemon.give_up(validate_name(args.name), force_delete=args.delete))
    return 0


def cmd_stop_post(args: argparse.Namespace) -> int:
    result = daemon.after_stop(validate_name(args.name), os.environ.get("SERVICE_RESULT", ""),
                               os.environ.get("EXIT_CODE", ""), os.environ.get("EXIT_STATUS", ""))
    log.info("%s", result)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    daemon.require_root()
    with contextlib.closing(ControlDevice()) as control:
        mask = control.features()
    if args.json:
        print(json.dumps({"mask": mask, "features": uapi.feature_names(mask)}))
        return 0
    print(f"kernel {os.uname().release}: ublk features {mask:#x}")
    width = max(len(feature.name) for feature in uapi.FEATURES)
    for feature in uapi.FEATURES:
        if mask & feature.bit:
            print(f"  {feature.name:<{width}}  {feature.meaning}")
    missing = [f for f in uapi.FEATURES if not mask & f.bit]
    if missing:
        print("not in this kernel:")
        for feature in missing:
            print(f"  {feature.name:<{width}}  (Linux {feature.since}) {feature.meaning}")
    unknown = mask & ~sum(f.bit for f in uapi.FEATURES)
    if unknown:
        print(f"  {unknown:#x}  bits newer than this ublkd")
    return 0


def cmd_dbus(_args: argparse.Namespace) -> int:
    daemon.require_root()
    from ublkd import dbus_service  # pydbus and GLib: only this command needs them

    return dbus_service.serve()


# -- helpers -------------------------------------------------------------------
LIST_COLUMNS = ("name", "id", "device", "state", "pid", "backend", "size")


def list_table(rows: list[dict]) -> str:
    """`ublkd list`'s text: a header line, then a line per row ("-" for None)."""
    table = [[str(row[c]) if row[c] is not None else "-" for c in LIST_COLUMNS] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(LIST_COLUMNS)]
    lines = [[c.upper() for c in LIST_COLUMNS], *table]
    return "".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                   + "\n" for line in lines)


if __name__ == "__main__":
    sys.exit(main())
