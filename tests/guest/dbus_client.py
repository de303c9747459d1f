"""Runs in the guest: a D-Bus client of org.ublkd1, written with pydbus as a
tool or a desktop would be (Debian's python3, whoever runs it).

    python3 dbus_client.py props NAME
        print the device's properties (GetAll) as JSON
    python3 dbus_client.py call METHOD NAME
        call org.ublkd1.Manager.METHOD(NAME); print {"ok": ...} or
        {"error": D-Bus error name, "message": its text} as JSON
    python3 dbus_client.py watch NAME SECONDS UNTIL_RECOVERIES
        subscribe to the device's PropertiesChanged, print "SUBSCRIBED", then
        one JSON line per signal ({"t": CLOCK_MONOTONIC seconds, "changed":
        {...}}) until Recoveries reaches UNTIL_RECOVERIES with State LIVE,
        or SECONDS pass; the client never polls
"""

import json
import sys
import time

import pydbus
from gi.repository import GLib

BUS_NAME = "org.ublkd1"
DEVICE_INTERFACE = "org.ublkd1.Device"


def device_path(bus, name: str) -> str:
    manager = bus.get(BUS_NAME, "/org/ublkd1/Manager")
    paths = [p for p in manager.ListDevices() if p.rsplit("/", 1)[1] == name]
    if not paths:
        raise SystemExit(f"{name} is not among {manager.ListDevices()}")
    return paths[0]


def props(bus, name: str) -> None:
    device = bus.get(BUS_NAME, device_path(bus, name))
    print(json.dumps(device.GetAll(DEVICE_INTERFACE)))


def call(bus, method: str, name: str) -> None:
    manager = bus.get(BUS_NAME, "/org/ublkd1/Manager")
    try:
        print(json.dumps({"ok": getattr(manager, method)(name)}))
    except GLib.Error as error:
        remote = error.message.split(": ", 1)  # "GDBus.Error:NAME: MESSAGE"
        print(json.dumps({"error": remote[0].removeprefix("GDBus.Error:"),
                          "message": remote[1] if len(remote) > 1 else ""}))


def watch(bus, name: str, seconds: float, until_recoveries: int) -> None:
    device = bus.get(BUS_NAME, device_path(bus, name))
    current = dict(device.GetAll(DEVICE_INTERFACE))
    loop = GLib.MainLoop()

    def changed(interface, values, _invalidated):
        if interface != DEVICE_INTERFACE:
            return
        current.update(values)
        print(json.dumps({"t": time.monotonic(), "changed": values}), flush=True)
        if current["Recoveries"] >= until_recoveries and current["State"] == "LIVE":
            loop.quit()

    device.PropertiesChanged.connect(changed)
    GLib.timeout_add(int(seconds * 1000), loop.quit)
    print("SUBSCRIBED", flush=True)
    loop.run()


def main() -> None:
    bus = pydbus.SystemBus()
    command, args = sys.argv[1], sys.argv[2:]
    if command == "props":
        props(bus, args[0])
    elif command == "call":
        call(bus, args[0], args[1])
    elif command == "watch":
        watch(bus, args[0], float(args[1]), int(args[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
