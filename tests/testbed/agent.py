#!/usr/bin/python3
"""The test bed's agent: runs the host's commands inside the guest.

It is started by ublkd-testbed-agent.service and talks over the virtio-serial
port named below, one JSON object per line each way.  Requests are handled
concurrently (a test may run fio in one request while it kills the daemon
in another); every reply carries the id of its request.

Requests:
  {"id": N, "op": "ping"}
      -> {"id": N, "boot_id": "...", "uptime": seconds since kernel start}
  {"id": N, "op": "run", "argv": [...], "stdin": base64|null,
   "timeout": seconds|null, "env": {...}|null, "cwd": path|null}
      -> {"id": N, "rc": int, "stdout": base64, "stderr": base64,
          "timed_out": bool}
A command that cannot be started answers rc 127 with the reason on stderr.

Standard library only: it runs under the guest's /usr/bin/python3 before
anything of the project is importable.
"""

import base64
import json
import os
import subprocess
import sys
import threading

PORT_NAME = "org.ublkd.testbed.agent"


def find_port(name: str) -> str:
    """The /dev node of the virtio-serial port called `name`."""
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)):
        with open(os.path.join(base, entry, "name")) as f:
            if f.read().strip() == name:
                return os.path.join("/dev", entry)
    raise SystemExit(f"agent: no virtio-serial port named {name}")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def run_command(request: dict) -> dict:
    stdin = base64.b64decode(request["stdin"]) if request.get("stdin") else b""
    env = dict(os.environ)
    env.update(request.get("env") or {})
    timed_out = False
    try:
        proc = subprocess.Popen(
            request["argv"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=request.get("cwd"),
            start_new_session=True,
        )
    except OSError as exc:
        return {"rc": 127, "stdout": "", "stderr": _b64(f"agent: {exc}\n".encode()),
                "timed_out": False}
    try:
        out, err = proc.communicate(stdin, timeout=request.get("timeout"))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
    return {"rc": proc.returncode, "stdout": _b64(out), "stderr": _b64(err),
            "timed_out": timed_out}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Agent:
    def __init__(self, port: str):
        self.fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
        self.write_lock = threading.Lock()

    def reply(self, message: dict) -> None:
        """Send one line; the port takes a few KiB a write, so loop."""
        data = memoryview(json.dumps(message).encode() + b"\n")
        with self.write_lock:
            while data:
                data = data[os.write(self.fd, data):]

    def handle(self, request: dict) -> None:
        op = request.get("op")
        if op == "ping":
            result = {"boot_id": read_text("/proc/sys/kernel/random/boot_id"),
                      "uptime": float(read_text("/proc/uptime").split()[0])}
        elif op == "run":
            result = run_command(request)
        else:
            result = {"error": f"unknown op {op!r}"}
        self.reply({"id": request.get("id"), **result})

    def serve(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                # The host side is not connected; the port reads empty
                # until it is.
                threading.Event().wait(0.2)
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    request = json.loads(line)
                except ValueError:
                    print(f"agent: ignoring malformed line {line[:80]!r}", file=sys.stderr)
                    continue
                threading.Thread(target=self.handle, args=(request,), daemon=True).start()


if __name__ == "__main__":
    Agent(find_port(PORT_NAME)).serve()
