"""The D-Bus API's pure parts: object paths, the property mapping, error
names, the introspection data.  The bus itself is tested in the guest
(tests/guest/test_dbus.py)."""

from __future__ import annotations

import pytest
from gi.repository import Gio, GLib

from ublkd import dbus_service
from ublkd.errors import DeviceNotFoundError, HandOverRefusedError
from ublkd.inventory import device_row, unserved_row
from ublkd.kernel.control import DeviceInfo
from ublkd.state import DeviceState


@pytest.mark.parametrize("name, label", [
    ("vol0", "vol0"), ("vol-0", "vol_2d0"), ("a.b_c", "a_2eb_5fc"), ("0", "0"),
])
def test_object_paths_are_valid_and_distinct(name, label):
    path = dbus_service.object_path(name)
    assert path == f"/org/ublkd1/devices/{label}"
    assert GLib.Variant.is_object_path(path)


def test_names_that_differ_get_different_paths():
    # '_' is escaped too, so "a_2d" cannot collide with "a-".
    assert dbus_service.object_path("a-") != dbus_service.object_path("a_2d")


def test_introspection_parses_and_documents_every_property():
    device = Gio.DBusNodeInfo.new_for_xml(dbus_service.DEVICE_XML).interfaces[0]
    assert [p.name for p in device.properties] == [p[0] for p in dbus_service.DEVICE_PROPERTIES]
    for prop in device.properties:
        assert prop.annotations[0].key == "org.gtk.GDBus.DocString", prop.name
    manager = Gio.DBusNodeInfo.new_for_xml(dbus_service.MANAGER_XML).interfaces[0]
    assert {m.name for m in manager.methods} == {"ListDevices", "Start", "Stop", "Recover",
                                                 "Upgrade"}


def live_row(state: int = 1) -> dict:
    info = DeviceInfo(dev_id=3, nr_queues=2, queue_depth=64, state=state,
                      max_io_buf_bytes=0, pid=4242, flags=0)
    saved = DeviceState(name="vol0", dev_id=3, flags=0,
                        params={"dev_sectors": 131072},
                        config={"backend": "file", "path": "/srv/vol0.img", "uri": None,
                                "recovery": "reissue"},
                        pid=4242, generation=3, created="c", updated="u", version="0.1.0")
    return device_row(3, "vol0", info, saved)


def test_a_live_device_maps_onto_the_properties():
    properties = dbus_service.device_properties(live_row(), "active")
    assert properties == {
        "Name": "vol0", "BlockDevice": "/dev/ublkb3", "Id": 3, "State": "LIVE",
        "Backend": "file", "Target": "/srv/vol0.img", "Size": 64 << 20,
        "RecoveryMode": "reissue", "Generation": 3, "Recoveries": 2, "ServerPid": 4242,
        "UnitActiveState": "active",
    }
    assert list(properties) == [p[0] for p in dbus_service.DEVICE_PROPERTIES]


def test_a_waiting_device_has_no_server_pid():
    # The kernel still reports the dead daemon's pid while the device is QUIESCED.
    properties = dbus_service.device_properties(live_row(state=2), "activating")
    assert (properties["State"], properties["ServerPid"]) == ("QUIESCED", 0)


def test_a_device_never_started_shows_its_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKD_CONF_DIR", str(tmp_path))
    tmp_path.chmod(0o755)
    (tmp_path / "net.toml").write_text('backend = "nbd"\nuri = "nbd://127.0.0.1/disk"\n')
    row = unserved_row("net")
    properties = dbus_service.device_properties(row, "inactive")
    assert (properties["State"], properties["BlockDevice"], properties["Id"]) == ("gone", "", -1)
    assert (properties["Backend"], properties["Target"], properties["Size"]) == \
        ("nbd", "nbd://127.0.0.1/disk", 0)


def test_ublkd_errors_become_named_dbus_errors():
    @dbus_service.dbus_errors
    def failing(error):
        raise error

    with pytest.raises(Exception) as caught:
        failing(DeviceNotFoundError("vol9: no such device"))
    assert type(caught.value).__name__ == "org.ublkd1.Error.DeviceNotFound"
    assert str(caught.value) == "vol9: no such device"
    with pytest.raises(Exception) as caught:
        failing(HandOverRefusedError("vol0: recovery none"))
    assert type(caught.value).__name__ == "org.ublkd1.Error.HandOverRefused"
    assert type(dbus_service.access_denied("no")).__name__ == \
        "org.freedesktop.DBus.Error.AccessDenied"
