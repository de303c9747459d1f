"""The D-Bus API: org.ublkd1 on the system bus, for tools and desktops.

`ublkd dbus` (ublkd-dbus.service, started by the bus when a client first
calls org.ublkd1) publishes

  /org/ublkd1/Manager        org.ublkd1.Manager: list, start, stop,
                             recover and upgrade devices
  /org/ublkd1/devices/NAME   org.ublkd1.Device: one device's properties,
                             with PropertiesChanged when any changes

It only reads devices itself (the same view as `ublkd status --json`, from
ublkd.inventory); everything that changes one goes through systemd's own
D-Bus API (start, stop, the recover unit, the hand-over), so systemd knows
about every action and the service holds no device state that its death
could lose.  docs/dbus.md has the decisions; ublkd(8) the API.

The properties change without a call of ours (a daemon crashes, systemd
restarts it, the new one recovers the device), so the service watches what
announces such changes: systemd's signals for ublkd@ units and the state and
configuration directories.  After each such event it reads every device
four times a second for two seconds, and every ten seconds regardless: a
change is signalled within about a quarter of a second of the event, with
no polling by clients.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from ublkd import __version__, handover, inventory, systemd
from ublkd.config import conf_dir, validate_name
from ublkd.errors import DeviceNotFoundError, MissingDependencyError, UblkdError
from ublkd.kernel.control import ControlDevice
from ublkd.state import load_state, state_dir

try:
    import pydbus
    from gi.repository import Gio, GLib
    from pydbus.generic import signal as dbus_signal
except ImportError as error:  # pragma: no cover - a packaging problem, reported by the CLI
    raise MissingDependencyError(
        f"the D-Bus service needs pydbus ({error}): install the Debian package "
        f"python3-pydbus"
    ) from None

log = logging.getLogger(__name__)

BUS_NAME = "org.ublkd1"
MANAGER_PATH = "/org/ublkd1/Manager"
DEVICES_PATH = "/org/ublkd1/devices"
MANAGER_INTERFACE = "org.ublkd1.Manager"
DEVICE_INTERFACE = "org.ublkd1.Device"
MANAGE_ACTION = "org.ublkd1.manage"
ERROR_PREFIX = "org.ublkd1.Error."

BURST_SECONDS = 2.0  # after an event, read the devices for this long ...
BURST_INTERVAL_MS = 250  # ... this often
BACKSTOP_INTERVAL_S = 10  # and always this often, for what no event announces
# The units whose state changes a device's properties (ublkd@, and the
# recover and give-up units that act on it), as systemd's object paths
# spell them, and the unit properties whose change means "look again":
# systemd sends PropertiesChanged for every watchdog ping and STATUS= too.
UNIT_PATHS = tuple(f"/org/freedesktop/systemd1/unit/{prefix}" for prefix in
                   ("ublkd_40", "ublkd_2drecover_40", "ublkd_2dgiveup_40"))
UNIT_PROPERTIES = ("ActiveState", "SubState", "MainPID")
JOB_TIMEOUT_S = 300.0  # a start may recover a device whose backend is slow

DOC = "org.gtk.GDBus.DocString"  # the annotation gdbus-codegen and d-feet show


def _doc(text: str) -> str:
    return f'<annotation name="{DOC}" value="{html.escape(text)}"/>'


# name, arguments ("in NAME TYPE" or "out NAME TYPE"), documentation.
MANAGER_METHODS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("ListDevices", ("out devices ao",),
     "Every configured device and every device ublkd has state for."),
    ("Start", ("in name s", "out device o"),
     "Start ublkd@NAME.service: create the device, or recover it if it exists."),
    ("Stop", ("in name s",),
     "Stop ublkd@NAME.service: the device is removed (its mounts must be gone)."),
    ("Recover", ("in name s", "out device o"),
     "Start ublkd-recover@NAME.service: recover a device kept after systemd gave up "
     "restarting its daemon, and serve it again."),
    ("Upgrade", ("in name s", "out device o"),
     "Hand the running device over to a daemon of the ublkd installed now (what "
     "`ublkd upgrade NAME` does)."),
)


def _method(name: str, args: tuple[str, ...], doc: str) -> str:
    arg_xml = "".join(f'<arg name="{arg}" type="{kind}" direction="{direction}"/>'
                      for direction, arg, kind in (a.split() for a in args))
    return f'<method name="{name}">{_doc(doc)}{arg_xml}</method>'


MANAGER_XML = f"""
<node>
  <interface name="{MANAGER_INTERFACE}">
    {_doc("ublkd's devices: one per /etc/ublkd/NAME.toml, served by ublkd@NAME.service. "
          "Methods need root or polkit's org.ublkd1.manage and act through systemd; "
          "they return when systemd's job is done.")}
    {"".join(_method(*method) for method in MANAGER_METHODS)}
    <signal name="DeviceAdded"><arg name="device" type="o"/></signal>
    <signal name="DeviceRemoved"><arg name="device" type="o"/></signal>
    <property name="Version" type="s" access="read"/>
  </interface>
</node>
"""

# name, D-Bus type, documentation; the order of `busctl introspect`.
DEVICE_PROPERTIES: tuple[tuple[str, str, str], ...] = (
    ("Name", "s", "The device's name: /etc/ublkd/NAME.toml, ublkd@NAME.service."),
    ("BlockDevice", "s", "/dev/ublkbN, or empty when it has no kernel device."),
    ("Id", "i", "The kernel's device id N, or -1."),
    ("State", "s", "The kernel's state: LIVE, QUIESCED (no daemon, I/O held), DEAD, "
                   "FAIL_IO, or gone (no kernel device)."),
    ("Backend", "s", "file, nbd or null; empty if the configuration does not load."),
    ("Target", "s", "What the device serves: the backing file's path or the NBD URI."),
    ("Size", "t", "Size in bytes; 0 if unknown (an NBD export before the first start)."),
    ("RecoveryMode", "s", "What happens to I/O while no daemon runs: reissue, abort, none."),
    ("Generation", "u", "Serving processes so far: 1 at creation, +1 per recovery; 0 when "
                        "not created."),
    ("Recoveries", "u", "How often a new daemon recovered the device (crashes, kills, "
                        "hand-overs)."),
    ("ServerPid", "u", "The pid of the daemon serving the device; 0 unless State is LIVE."),
    ("UnitActiveState", "s", "ActiveState of ublkd@NAME.service."),
)

DEVICE_XML = f"""
<node>
  <interface name="{DEVICE_INTERFACE}">
    {_doc("One ublkd device; every property emits PropertiesChanged.")}
    {"".join(f'''
    <property name="{name}" type="{kind}" access="read">
      {_doc(text)}
    </property>''' for name, kind, text in DEVICE_PROPERTIES)}
  </interface>
</node>
"""


def error_named(suffix: str, message: str) -> Exception:
    """An exception pydbus returns as the D-Bus error `org.ublkd1.Error.SUFFIX`
    (or a full name containing dots): pydbus names errors by the class name."""
    name = suffix if "." in suffix else ERROR_PREFIX + suffix
    return type(name, (Exception,), {})(message)


def access_denied(message: str) -> Exception:
    return error_named("org.freedesktop.DBus.Error.AccessDenied", message)


def dbus_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ublkd's errors into D-Bus errors named after them
    (DeviceNotFoundError -> org.ublkd1.Error.DeviceNotFound), logged once."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except UblkdError as error:
            log.warning("%s", error)
            raise error_named(type(error).__name__.removesuffix("Error"), str(error)) from None
        except Exception as error:
            if type(error).__name__.count(".") == 0:
                log.exception("internal error in %s", method.__name__)
            else:
                log.warning("%s: %s", type(error).__name__, error)
            raise
    return wrapper


def object_path(name: str) -> str:
    """The device's object path: letters and digits as they are, every other
    byte as _XX (as systemd escapes unit names), since device names may hold
    '.', '-' and '_' and object paths may not."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)
    return f"{DEVICES_PATH}/{label}"


def device_properties(row: dict, active_state: str) -> dict[str, Any]:
    """The D-Bus properties of one inventory row (see DEVICE_PROPERTIES)."""
    has_device = row["state"] != "gone" or row["generation"] is not None
    return {
        "Name": row["name"],
        "BlockDevice": row["device"] if has_device and row["device"] else "",
        "Id": row["id"] if has_device and row["id"] is not None else -1,
        "State": row["state"],
        "Backend": row["backend"] or "",
        "Target": row["uri"] or row["path"] or row["image"] or "",
        "Size": row["size_bytes"] or 0,
        "RecoveryMode": row["recovery"] or "",
        "Generation": row["generation"] or 0,
        "Recoveries": row["recoveries"] or 0,
        # The kernel keeps a dead daemon's pid while the device waits (QUIESCED).
        "ServerPid": (row["pid"] or 0) if row["state"] == "LIVE" else 0,
        "UnitActiveState": active_state,
    }


def unit_of(name: str) -> str:
    return f"ublkd@{name}.service"


class Device:
    """/org/ublkd1/devices/NAME: properties read from the inventory."""

    dbus = DEVICE_XML
    PropertiesChanged = dbus_signal()

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties

    def __getattr__(self, name: str) -> Any:
        # pydbus reads a property as an attribute of this object.
        try:
            return self.__dict__["properties"][name]
        except KeyError:
            raise AttributeError(name) from None

    def update(self, properties: dict[str, Any]) -> None:
        """Take the new values; signal those that changed."""
        changed = {key: value for key, value in properties.items()
                   if self.properties.get(key) != value}
        self.properties = properties
        if changed:
            self.PropertiesChanged(DEVICE_INTERFACE, changed, [])


class Manager:
    """/org/ublkd1/Manager (see MANAGER_XML)."""

    dbus = MANAGER_XML
    DeviceAdded = dbus_signal()
    DeviceRemoved = dbus_signal()

    def __init__(self, service: Service) -> None:
        self.service = service

    @property
    def Version(self) -> str:  # noqa: N802 - D-Bus names
        return __version__

    @dbus_errors
    def ListDevices(self) -> list[str]:  # noqa: N802
        self.service.refresh()
        return [object_path(name) for name in sorted(self.service.devices)]

    @dbus_errors
    def Start(self, name: str, dbus_context: Any) -> str:  # noqa: N802
        name = self.service.authorize(dbus_context, "Start", name)
        if not (conf_dir() / f"{name}.toml").exists():
            raise DeviceNotFoundError(f"{name}: there is no {conf_dir()}/{name}.toml to start "
                                      f"it from; see ublkd.toml(5)")
        self.service.run_job("StartUnit", unit_of(name))
        return object_path(name)

    @dbus_errors
    def Stop(self, name: str, dbus_context: Any) -> None:  # noqa: N802
        name = self.service.authorize(dbus_context, "Stop", name)
        self.service.run_job("StopUnit", unit_of(name))

    @dbus_errors
    def Recover(self, name: str, dbus_context: Any) -> str:  # noqa: N802
        name = self.service.authorize(dbus_context, "Recover", name)
        state = self.service.active_state(name)
        if state in ("active", "activating", "reloading"):
            raise error_named("Busy", f"{name}: {unit_of(name)} is {state} and serves the "
                                      f"device; there is nothing to recover")
        self.service.run_job("StartUnit", f"ublkd-recover@{name}.service")
        self.service.wait_until_active(name)
        return object_path(name)

    @dbus_errors
    def Upgrade(self, name: str, dbus_context: Any) -> str:  # noqa: N802
        name = self.service.authorize(dbus_context, "Upgrade", name)
        state = load_state(name)
        if state is None:
            raise DeviceNotFoundError(f"{name}: ublkd has no state for it; nothing to hand over")
        handover.refuse_if_lost(name, state)
        systemd.hand_over(unit_of(name), pause=self.service.pause)
        self.service.refresh()
        return object_path(name)


class Service:
    """The bus connection, the published objects, and what keeps them current."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.systemd = bus.get("org.freedesktop.systemd1")
        self.devices: dict[str, Device] = {}
        self.registrations: dict[str, Any] = {}
        self.units_seen: dict[str, dict[str, Any]] = {}
        self.awaited_jobs: set[str] = set()  # job paths run_job waits for
        self.finished_jobs: dict[str, str] = {}  # of those: path -> result
        self.burst_until = 0.0
        self.burst_running = False
        self.monitors: list[Any] = []
        self.manager = Manager(self)

    # -- publishing ---------------------------------------------------------
    def publish(self) -> None:
        """Objects first, then the name: the bus delivers the activating call
        only once the name is ours, and it must find the objects there."""
        self.bus.register_object(MANAGER_PATH, self.manager, None)
        self.watch_systemd()
        self.watch_directories()
        self.refresh()
        GLib.timeout_add_seconds(BACKSTOP_INTERVAL_S, self.refresh_and_continue)
        self.bus.request_name(BUS_NAME, allow_replacement=False, replace=False)
        log.info("serving %s on the system bus: %d devices", BUS_NAME, len(self.devices))

    def watch_systemd(self) -> None:
        # PID 1 sends unit signals only to clients that subscribed.
        self.systemd.Subscribe()
        self.bus.subscribe(sender="org.freedesktop.systemd1",
                           iface="org.freedesktop.DBus.Properties", signal="PropertiesChanged",
                           signal_fired=self.on_unit_changed)
        self.bus.subscribe(sender="org.freedesktop.systemd1",
                           iface="org.freedesktop.systemd1.Manager", signal="JobRemoved",
                           signal_fired=self.on_job_removed)

    def watch_directories(self) -> None:
        for directory in (state_dir(), conf_dir()):
            monitor = Gio.File.new_for_path(str(directory)).monitor_directory(
                Gio.FileMonitorFlags.NONE, None)
            monitor.connect("changed", lambda *_: self.refresh_soon())
            self.monitors.append(monitor)

    def on_unit_changed(self, _sender: str, path: str, _iface: str, _signal: str,
                        params: tuple) -> None:
        if not path.startswith(UNIT_PATHS):
            return
        seen = self.units_seen.setdefault(path, {})
        news = {key: value for key, value in params[1].items()
                if key in UNIT_PROPERTIES and seen.get(key) != value}
        if news:
            seen.update(news)
            self.refresh_soon()

    def on_job_removed(self, _sender: str, _path: str, _iface: str, _signal: str,
                       params: tuple) -> None:
        _, job, unit, result = params
        if job in self.awaited_jobs:
            self.finished_jobs[job] = result
        if unit.startswith("ublkd"):
            self.refresh_soon()

    # -- keeping the properties current -------------------------------------
    def refresh_soon(self) -> None:
        """Read the devices now and every BURST_INTERVAL_MS for BURST_SECONDS:
        one event (a crash) is followed by others (the restart, the recovery)."""
        self.burst_until = time.monotonic() + BURST_SECONDS
        if not self.burst_running:
            self.burst_running = True
            GLib.idle_add(self.refresh_once)
            GLib.timeout_add(BURST_INTERVAL_MS, self.burst_step)

    def burst_step(self) -> bool:
        self.refresh()
        self.burst_running = time.monotonic() < self.burst_until
        return self.burst_running

    def refresh_and_continue(self) -> bool:
        self.refresh()
        return True

    def refresh_once(self) -> bool:
        self.refresh()
        return False

    def refresh(self) -> None:
        """Read every device; publish new ones, signal changes, drop the gone."""
        try:
            rows = self.read_devices()
            unit_states = self.read_unit_states()
        except Exception:
            log.exception("could not read the devices; the properties stay as they were")
            return
        for name, row in rows.items():
            properties = device_properties(row, unit_states.get(name, "inactive"))
            if name in self.devices:
                self.devices[name].update(properties)
            else:
                self.add_device(name, properties)
        for name in set(self.devices) - set(rows):
            self.remove_device(name)

    def read_devices(self) -> dict[str, dict]:
        try:
            control = ControlDevice()
        except UblkdError as error:
            # No driver (not loaded yet): only what the configuration says.
            log.debug("%s", error)
            return {name: inventory.unserved_row(name) for name in inventory.configured_names()}
        with contextlib.closing(control):
            return inventory.known_devices(control)

    def read_unit_states(self) -> dict[str, str]:
        """ActiveState of every loaded ublkd@NAME.service, by NAME (one call)."""
        units = self.systemd.ListUnitsByPatterns([], ["ublkd@*.service"])
        return {unit[0].removeprefix("ublkd@").removesuffix(".service"): unit[3]
                for unit in units}

    def active_state(self, name: str) -> str:
        return self.read_unit_states().get(name, "inactive")

    def add_device(self, name: str, properties: dict[str, Any]) -> None:
        device = Device(properties)
        self.registrations[name] = self.bus.register_object(object_path(name), device, None)
        self.devices[name] = device
        self.manager.DeviceAdded(object_path(name))

    def remove_device(self, name: str) -> None:
        self.registrations.pop(name).unregister()
        del self.devices[name]
        self.manager.DeviceRemoved(object_path(name))

    # -- acting through systemd ---------------------------------------------
    def authorize(self, context: Any, verb: str, name: str) -> str:
        """The validated name, if the caller may `verb` it: root, or a caller
        polkit authorizes for org.ublkd1.manage.  Raises AccessDenied, and
        nothing happens, otherwise."""
        name = validate_name(name)
        uid = self.bus.dbus.GetConnectionUnixUser(context.sender)
        if uid == 0:
            return name
        # The caller's flag says whether polkit may ask for a password.
        interactive = bool(context._mi.get_message().get_flags()
                           & Gio.DBusMessageFlags.ALLOW_INTERACTIVE_AUTHORIZATION)
        try:
            allowed = context.is_authorized(MANAGE_ACTION, {"name": name, "method": verb},
                                            interactive)
        except GLib.Error as error:
            raise access_denied(f"{verb} {name}: uid {uid} is not root and polkit could not "
                                f"be asked ({error.message}); run it as root") from None
        if not allowed:
            raise access_denied(f"{verb} {name}: uid {uid} is not authorized; it needs root "
                                f"or polkit's {MANAGE_ACTION} (by default an administrator's "
                                f"password)")
        log.info("%s %s: uid %d authorized by polkit", verb, name, uid)
        return name

    def run_job(self, method: str, unit: str) -> None:
        """StartUnit/StopUnit, waiting for systemd's job while serving others."""
        log.info("%s %s", method, unit)
        # The reply comes before the job's JobRemoved is dispatched (both wait
        # for this main loop), so the job is awaited before it can end.
        job = getattr(self.systemd, method)(unit, "replace")
        self.awaited_jobs.add(job)
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while job not in self.finished_jobs:
                if time.monotonic() > deadline:
                    raise error_named("Timeout", f"{unit}: systemd's {method} job is not "
                                                 f"done after {JOB_TIMEOUT_S:.0f} s; see "
                                                 f"`systemctl status {unit}`")
                self.pause(0.05)
            result = self.finished_jobs.pop(job)
        finally:
            self.awaited_jobs.discard(job)
        self.refresh()
        if result != "done":
            raise error_named("Failed", f"{unit}: {method} ended with '{result}'; see "
                                        f"`journalctl -u {unit}`")

    def wait_until_active(self, name: str, timeout: float = JOB_TIMEOUT_S) -> None:
        unit = unit_of(name)
        deadline = time.monotonic() + timeout
        while (state := self.active_state(name)) != "active":
            if state == "failed" or time.monotonic() > deadline:
                raise error_named("Failed", f"{unit} is {state}, not active; see "
                                            f"`journalctl -u {unit}`")
            self.pause(0.1)
        self.refresh()

    @staticmethod
    def pause(seconds: float) -> None:
        """Wait while the main loop goes on: signals, other clients' calls."""
        context = GLib.MainContext.default()
        done = []
        GLib.timeout_add(int(seconds * 1000), lambda: done.append(True) and False)
        while not done:
            context.iteration(True)


def serve() -> int:
    """Run the service until SIGTERM/SIGINT (`ublkd dbus`)."""
    logging.getLogger("pydbus.registration").setLevel(logging.CRITICAL)  # we log errors
    service = Service(pydbus.SystemBus())
    service.publish()
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, loop.quit)
    loop.run()
    return 0
