"""Boot the test bed by hand: `python -m tests.testbed {prepare,shell,run}`.

  prepare        install host packages, fetch the kernel, build the initramfs
  shell          boot a guest with its console and a root shell on this
                 terminal (Ctrl-A X quits qemu; Ctrl-A C its monitor)
  run CMD...     boot a guest, run CMD in it through the agent, print its
                 output and exit with its exit code, then power off
  demo           the demo: a ublk device outliving kills of its daemon
--kernel 6.18 boots Debian 13's kernel instead of 6.12.
Logs go to build/testbed/manual-<time>/ in the checkout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .guest import Guest, GuestConfig
from .provision import DEFAULT_KERNEL, KERNEL_LINES, prepare

CHECKOUT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kernel", choices=tuple(KERNEL_LINES), default=None,
                        help="the kernel to boot (default: UBLKD_TESTBED_KERNEL, else "
                             f"{DEFAULT_KERNEL})")
    parser.add_argument("action", choices=("prepare", "shell", "run", "demo"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "demo":
        from .demo import main as demo

        return demo()
    kernel = prepare(line=args.kernel)
    if args.action == "prepare":
        print(f"kernel {kernel.version}\n  {kernel.vmlinuz}\n  {kernel.initramfs}")
        return 0
    log_dir = CHECKOUT / "build" / "testbed" / time.strftime("manual-%Y%m%d-%H%M%S")
    if args.action == "shell":
        guest = Guest(kernel, log_dir, GuestConfig(interactive=True, boot_timeout=3600))
        guest.boot()
        print(f"guest ready ({guest.boot_seconds:.1f} s guest uptime); logs in {log_dir}",
              file=sys.stderr)
        return guest.qemu.wait()
    guest = Guest(kernel, log_dir)
    guest.boot()
    try:
        result = guest.run(args.command if len(args.command) > 1 else args.command[0],
                           check=False, timeout=None)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.rc
    finally:
        guest.shutdown()
        print(f"boot {guest.boot_seconds:.1f} s guest / {guest.boot_wall_seconds:.1f} s wall; "
              f"logs in {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
