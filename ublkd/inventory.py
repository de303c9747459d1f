"""Which devices ublkd knows and what each looks like, for `ublkd list/status`
and the D-Bus API: the kernel's view joined with the state files and the
configuration directory.  Read-only: nothing here changes a device."""

from __future__ import annotations

import logging

from ublkd import identity
from ublkd.config import conf_dir, format_size, load_config, name_problem, rbd_spec
from ublkd.errors import DeviceNotFoundError, UblkdError
from ublkd.kernel import uapi
from ublkd.kernel.control import ControlDevice, DeviceInfo, device_ids
from ublkd.state import DeviceState, list_states

log = logging.getLogger(__name__)


def device_rows(control: ControlDevice) -> list[dict]:
    """One row per kernel device or state file, joined on the device id."""
    states: dict[int, DeviceState] = {}
    rows = []
    for entry in list_states():
        if isinstance(entry, UblkdError):
            log.warning("%s", entry)
        else:
            states[entry.dev_id] = entry
    configured = names_by_cookie()
    for dev_id in sorted(set(device_ids()) | set(states)):
        try:
            info: DeviceInfo | None = control.get_info(dev_id)
        except DeviceNotFoundError:
            info = None
        state = states.get(dev_id)
        name = state.name if state else configured.get(info.cookie) if info else None
        rows.append(device_row(dev_id, name, info, state))
    return rows


def configured_names() -> list[str]:
    """The names of /etc/ublkd/*.toml that can name a device, sorted."""
    return sorted(path.stem for path in conf_dir().glob("*.toml")
                  if name_problem(path.stem) is None)


def names_by_cookie() -> dict[int, str]:
    """Every configured device's name by its cookie: names a kernel device whose
    state file is corrupt or lost."""
    return {identity.cookie_of(name): name for name in configured_names()}


def device_row(dev_id: int, name: str | None, info: DeviceInfo | None,
               state: DeviceState | None) -> dict:
    """What `ublkd status --json` prints for one device."""
    config = state.config if state else {}
    return {
        "name": name,
        "id": dev_id,
        "device": f"/dev/ublkb{dev_id}",
        "state": info.state_name if info else "gone",
        "pid": info.pid if info and info.pid > 0 else None,
        "backend": config.get("backend"),
        "path": config.get("path"),
        "uri": config.get("uri"),
        "image": rbd_image(config),
        "size": format_size(state.params["dev_sectors"] << 9) if state else None,
        "size_bytes": state.params["dev_sectors"] << 9 if state else None,
        "recovery": config.get("recovery"),
        "queues": info.nr_queues if info else None,
        "queue_depth": info.queue_depth if info else None,
        # What the kernel serves the device with: QUIESCE (hand-overs),
        # AUTO_BUF_REG (zero copy), the recovery bits.
        "flags": uapi.feature_names(info.flags) if info else None,
        "generation": state.generation if state else None,
        "recoveries": state.generation - 1 if state else None,
        "version": state.version if state else None,
    }


def rbd_image(config: dict) -> str | None:
    """An rbd device's image as the rbd tool names it, from its config's dict."""
    if config.get("backend") != "rbd":
        return None
    return rbd_spec(config.get("pool"), config.get("namespace"), config.get("image"),
                    config.get("snapshot"))


def unserved_row(name: str) -> dict:
    """A configured device with no kernel device and no state: what its
    configuration says it would be.  A config that does not load (a typo, a
    file not root's) shows as much as is known: its name."""
    row = dict.fromkeys(device_row(-1, name, None, None), None)
    row.update(name=name, state="gone")
    try:
        config = load_config(name)
    except UblkdError as error:
        log.info("%s", error)
        return row
    row.update(backend=config.backend, path=None if config.path is None else str(config.path),
               uri=config.uri, image=rbd_image(config.to_dict()), recovery=config.recovery,
               size_bytes=config.size,
               size=None if config.size is None else format_size(config.size))
    return row


def known_devices(control: ControlDevice) -> dict[str, dict]:
    """Every named device ublkd knows, by name: the kernel's and the state
    files' (device_rows), and every configured one not among them."""
    rows = {row["name"]: row for row in device_rows(control) if row["name"] is not None}
    for name in configured_names():
        if name not in rows:
            rows[name] = unserved_row(name)
    return rows
