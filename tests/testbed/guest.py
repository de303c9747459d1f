"""A qemu guest with the Debian 6.12 kernel and systemd as PID 1.

The host's root file system is the guest's (read-only over 9p, under a tmpfs
overlay), so the checkout, its venv and every installed tool are there at
the same paths.  Commands reach the guest through the agent (agent.py) over
a virtio-serial port; the console goes to a log file that outlives the run.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .provision import KernelBuild

AGENT_PORT_NAME = "org.ublkd.testbed.agent"


class GuestError(RuntimeError):
    """Base of the harness's errors; every message names the console log."""


class GuestBootError(GuestError):
    """The guest did not come up (kernel panic, qemu died, or boot timeout)."""


class GuestCommandError(GuestError):
    """A command run in the guest with check=True exited non-zero."""


@dataclass
class Result:
    """What a command in the guest did."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False

    def describe(self) -> str:
        return (
            f"guest command {shlex.join(self.argv)!r} "
            + ("timed out" if self.timed_out else f"exited {self.rc}")
            + f"\n--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


@dataclass
class GuestConfig:
    """How to start a guest; the defaults suit the test suite."""

    memory_mib: int = 3072
    cpus: int = 2
    boot_timeout: float = float(os.environ.get("UBLKD_TESTBED_BOOT_TIMEOUT", 300))
    kernel_args: list[str] = field(default_factory=list)
    disks: list[Path] = field(default_factory=list)  # raw images, virtio serial disk<N>
    interactive: bool = False  # console on this terminal, root shell on ttyS0


class AgentConnection:
    """The host end of the agent protocol: one socket, replies matched by id."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.ids = itertools.count(1)
        self.pending: dict[int, tuple[threading.Event, list]] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue  # not ours (a reboot cut a line); never fatal
                waiter = self.pending.pop(reply.get("id"), None)
                if waiter:
                    waiter[1].append(reply)
                    waiter[0].set()
        self.closed.set()
        for event, _ in list(self.pending.values()):
            event.set()

    def request(self, message: dict, timeout: float | None) -> dict | None:
        """Send one request; None if no reply came within `timeout`."""
        request_id = next(self.ids)
        event, box = threading.Event(), []
        self.pending[request_id] = (event, box)
        line = json.dumps({"id": request_id, **message}).encode() + b"\n"
        try:
            with self.lock:
                self.sock.sendall(line)
        except OSError:
            return None  # qemu is gone; the caller says why
        event.wait(timeout)
        self.pending.pop(request_id, None)
        return box[0] if box else None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Guest:
    """One guest machine.  `boot()` starts it; `reboot()` starts it again.

    A reboot is a real shutdown inside the guest (systemd stops every unit,
    as on a machine) followed by a fresh qemu with the same disks: the
    tmpfs overlay is gone, the disks keep what was written to them.
    """

    def __init__(self, kernel: KernelBuild, log_dir: Path, config: GuestConfig | None = None):
        self.kernel = kernel
        self.log_dir = log_dir
        self.config = config or GuestConfig()
        self.boots = 0
        self.qemu: subprocess.Popen | None = None
        self.agent: AgentConnection | None = None
        self.boot_id = ""
        self.boot_seconds = 0.0  # guest uptime when the agent first answered
        self.boot_wall_seconds = 0.0  # qemu start to agent ready, host clock

    # -- paths ---------------------------------------------------------------
    @property
    def console_log(self) -> Path:
        return self.log_dir / f"console-boot{self.boots}.log"

    @property
    def journal_log(self) -> Path:
        return self.log_dir / f"journal-boot{self.boots}.txt"

    @property
    def socket_path(self) -> Path:
        return self.log_dir / f"agent-boot{self.boots}.sock"

    def where_logs_are(self) -> str:
        return f"console log: {self.console_log}\njournal: {self.journal_log}"

    # -- life cycle ----------------------------------------------------------
    def qemu_argv(self) -> list[str]:
        cfg = self.config
        cmdline = [
            "console=ttyS0",
            "panic=-1",
            "maxcpus=1",  # init.sh brings the other vCPUs online; why: docs/testbed.md
            f"testbed.modules={self.kernel.modules}",
            "systemd.unit=ublkd-testbed.target",
            "modules-load=ublk_drv",
            "systemd.show_status=1",
            "systemd.status_unit_format=name",  # "Stopped ublkd@vol0.service." on the console
            *(["testbed.shell"] if cfg.interactive else []),
            *cfg.kernel_args,
        ]
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-smp", str(cfg.cpus),
            "-m", str(cfg.memory_mib),
            "-no-reboot",
            "-nic", "none",
            "-display", "none",
            "-vga", "none",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.kernel.initramfs),
            "-append", " ".join(cmdline),
            "-virtfs",
            "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={self.socket_path},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
        if cfg.interactive:
            argv += ["-chardev", f"stdio,id=console,mux=on,signal=off,logfile={self.console_log}",
                     "-serial", "chardev:console", "-mon", "chardev=console"]
        else:
            argv += ["-chardev", f"file,id=console,path={self.console_log}",
                     "-serial", "chardev:console", "-monitor", "none"]
        for index, disk in enumerate(self.config.disks):
            argv += ["-drive", f"file={disk},format=raw,if=none,id=disk{index},cache=unsafe",
                     "-device", f"virtio-blk-pci,drive=disk{index},serial=disk{index}"]
        return argv

    def boot(self) -> None:
        """Start qemu and wait until systemd finished booting and the agent answers."""
        self.boots += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        started = time.monotonic()
        deadline = started + self.config.boot_timeout
        stdio = None if self.config.interactive else subprocess.DEVNULL
        self.qemu = subprocess.Popen(
            self.qemu_argv(), stdin=stdio, stdout=stdio, stderr=subprocess.PIPE
        )
        self.agent = self._connect_agent(deadline)
        pong = self._wait_for_agent(deadline)
        self.boot_id = pong["boot_id"]
        self.boot_seconds = pong["uptime"]
        self.boot_wall_seconds = time.monotonic() - started
        remaining = max(deadline - time.monotonic(), 1.0)
        state = self.run(["systemctl", "is-system-running", "--wait"],
                         check=False, timeout=remaining)
        if state.stdout.strip() not in ("running", "degraded"):
            self._boot_failed(f"systemd did not finish booting: {state.stdout.strip()!r}")

    def _connect_agent(self, deadline: float) -> AgentConnection:
        while time.monotonic() < deadline:
            self._check_qemu_alive()
            if self.socket_path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self.socket_path))
                    return AgentConnection(sock)
                except OSError:
                    sock.close()
            time.sleep(0.05)
        self._boot_failed("qemu never opened the agent socket")

    def _wait_for_agent(self, deadline: float) -> dict:
        while time.monotonic() < deadline:
            self._check_qemu_alive()
            pong = self.agent.request({"op": "ping"}, timeout=1.0)
            if pong:
                return pong
        self._boot_failed(f"the agent did not answer within {self.config.boot_timeout:.0f} s")

    def _check_qemu_alive(self) -> None:
        if self.qemu.poll() is not None:
            stderr = self.qemu.stderr.read().decode(errors="replace") if self.qemu.stderr else ""
            self._boot_failed(f"qemu exited with code {self.qemu.returncode}. {stderr.strip()}")

    def _boot_failed(self, why: str) -> None:
        self.kill()
        tail = ""
        if self.console_log.exists():
            lines = self.console_log.read_text(errors="replace").splitlines()
            tail = "\n".join(lines[-25:])
        raise GuestBootError(
            f"guest boot {self.boots} failed: {why}\nconsole log: {self.console_log}\n"
            f"--- last console lines ---\n{tail}"
        )

    def kill(self) -> None:
        """Stop qemu at once (no guest shutdown)."""
        if self.agent:
            self.agent.close()
            self.agent = None
        if self.qemu and self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()

    def shutdown(self, timeout: float = 120) -> None:
        """Power the guest off the way a user would, keeping its journal first."""
        if not self.qemu or self.qemu.poll() is not None:
            return
        self.save_journal()
        self.run(["systemctl", "--no-block", "poweroff"], check=False, timeout=30)
        try:
            self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def reboot(self) -> None:
        """Shut the guest down cleanly, then boot a new one with the same disks."""
        self.shutdown()
        self.boot()

    def power_cycle(self) -> None:
        """Pull the plug and boot again: for a guest in an unknown state (a
        failed test's fio still running on a device with no server), whose
        clean shutdown could itself hang."""
        self.kill()
        self.boot()

    # -- using the guest -----------------------------------------------------
    def run(
        self,
        command: str | list[str],
        *,
        check: bool = True,
        timeout: float | None = 600,
        input: bytes | str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Run `command` in the guest (a string goes through /bin/sh -c).

        With check=True a non-zero exit raises GuestCommandError carrying the
        command's output and where the guest's logs are.
        """
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if isinstance(input, str):
            input = input.encode()
        request = {
            "op": "run",
            "argv": argv,
            "stdin": base64.b64encode(input).decode() if input else None,
            "timeout": timeout,
            "env": env,
            "cwd": cwd,
        }
        if not self.agent:
            raise GuestError(f"the guest is not running\n{self.where_logs_are()}")
        # The agent enforces `timeout`; the extra time covers the transport.
        reply = self.agent.request(request, timeout=None if timeout is None else timeout + 30)
        if reply is None:
            raise GuestError(
                f"no answer from the guest for {shlex.join(argv)!r} "
                f"(guest dead or agent stuck)\n{self.where_logs_are()}"
            )
        result = Result(
            argv=argv,
            rc=reply["rc"],
            stdout=base64.b64decode(reply["stdout"]).decode(errors="replace"),
            stderr=base64.b64decode(reply["stderr"]).decode(errors="replace"),
            timed_out=reply["timed_out"],
        )
        if check and (result.rc != 0 or result.timed_out):
            raise GuestCommandError(f"{result.describe()}\n{self.where_logs_are()}")
        return result

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Create `path` in the guest with `data` (parents created)."""
        self.run(
            ["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
             "write_file", path, format(mode, "o")],
            input=data if isinstance(data, bytes) else data.encode(),
        )

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def journal(self, *args: str) -> str:
        """journalctl of this boot, e.g. journal("-u", "ublkd@vol0")."""
        return self.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic", *args]).stdout

    def save_journal(self) -> Path:
        """Write this boot's journal next to the console log; returns its path."""
        try:
            self.journal_log.write_text(self.journal())
        except GuestError as exc:
            self.journal_log.write_text(f"journal not available: {exc}\n")
        return self.journal_log
