"""State files: round trip, atomic writes, and every way a file can be rejected."""

import json
import os
import stat
from dataclasses import asdict, replace
from pathlib import Path

import pytest

import ublkd
from ublkd import state
from ublkd.config import parse_config
from ublkd.errors import ConfigError, CorruptStateError, StateError
from ublkd.state import (DeviceState, list_states, load_state, next_generation, remove_state,
                         save_state)

CONFIG = parse_config("vol0", 'backend = "file"\npath = "/srv/vol0.img"\nsize = "1GiB"\n',
                      Path("/etc/ublkd/vol0.toml"))
CREATED = "2025-01-31T12:00:00.123456+00:00"
STATE = DeviceState(
    name="vol0", dev_id=3, flags=0x18, params={"basic": {"dev_sectors": 2097152}},
    config=CONFIG.to_dict(), pid=4242, generation=1, created=CREATED, updated=CREATED)
DELETE = object()  # a key to leave out of the file


@pytest.fixture
def directory(tmp_path):
    return tmp_path / "state"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_json(directory: Path, data: object, name: str = "vol0") -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def rejected(directory: Path, name: str = "vol0") -> str:
    """The message of the CorruptStateError that loading `name` raises."""
    with pytest.raises(CorruptStateError) as caught:
        load_state(name, directory)
    return str(caught.value)


def test_round_trip(directory):
    save_state(STATE, directory)
    assert load_state("vol0", directory) == STATE


def test_file_contents(directory):
    save_state(STATE, directory)
    assert mode(directory) == 0o700 and mode(directory / "vol0.json") == 0o600
    data = json.loads((directory / "vol0.json").read_text())
    assert data["schema"] == state.SCHEMA_VERSION == 1
    assert data["version"] == ublkd.__version__
    assert data["created"] == CREATED
    assert data["config"] == CONFIG.to_dict()


def test_absent_state_is_none(directory):
    assert load_state("vol0", directory) is None
    assert list_states(directory) == []


def test_state_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKD_STATE_DIR", str(tmp_path / "env"))
    assert state.state_dir() == tmp_path / "env"
    save_state(STATE)
    assert load_state("vol0") == STATE
    monkeypatch.delenv("UBLKD_STATE_DIR")
    assert state.state_dir() == Path("/var/lib/ublkd")


def test_new_directory_is_private_whatever_the_umask(directory):
    old = os.umask(0o277)  # would leave the owner without write permission
    try:
        save_state(STATE, directory / "deeper")
    finally:
        os.umask(old)
    assert mode(directory / "deeper") == 0o700


def test_directory_others_can_write_to_is_refused_not_chmodded(directory):
    directory.mkdir()
    directory.chmod(0o777)
    for action in (lambda: save_state(STATE, directory), lambda: load_state("vol0", directory),
                   lambda: list_states(directory)):
        with pytest.raises(StateError) as caught:
            action()
        assert f"chmod 700 {directory}" in str(caught.value)
        assert "writable by group or others (mode 0777)" in str(caught.value)
    assert mode(directory) == 0o777


def test_readable_existing_directory_is_accepted(directory):
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    save_state(STATE, directory)
    assert mode(directory) == 0o755


def test_failed_rename_keeps_the_old_file_and_no_temp_file(directory, monkeypatch):
    save_state(STATE, directory)
    before = (directory / "vol0.json").read_bytes()

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StateError) as caught:
        save_state(replace(STATE, pid=99, generation=2), directory)
    message = str(caught.value)
    assert message.startswith(f"{directory / 'vol0.json'}: cannot write the state of device 'vol0'")
    assert "No space left on device" in message and str(directory) in message
    assert (directory / "vol0.json").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["vol0.json"]


def test_data_is_synced_before_the_rename_and_the_directory_after(directory, monkeypatch):
    directory.mkdir(mode=0o700)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def replace_(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace_)
    save_state(STATE, directory)
    assert events == ["fsync file", "rename", "fsync dir"]


def test_stale_temp_files_are_cleaned_for_this_device_only(directory):
    directory.mkdir(mode=0o700)
    own = directory / ".vol0.json~abcd1234.tmp"
    other = directory / ".vol0.json.x.json~abcd1234.tmp"  # device "vol0.json.x"
    for path in (own, other):
        path.write_text('{"torn')
    save_state(STATE, directory)
    assert not own.exists() and other.exists()
    assert list_states(directory) == [STATE]


def test_remove_state(directory):
    remove_state("vol0", directory)  # absent: no error
    save_state(STATE, directory)
    (directory / ".vol0.json~abcd1234.tmp").write_text("")
    remove_state("vol0", directory)
    assert list(directory.iterdir()) == []


def test_list_states_shows_bad_files_as_errors(directory):
    save_state(STATE, directory)
    save_state(replace(STATE, name="vol2", config=replace(CONFIG, name="vol2").to_dict()),
               directory)
    (directory / "vol1.json").write_text("{")
    listed = list_states(directory)
    assert [item.name for item in listed if isinstance(item, DeviceState)] == ["vol0", "vol2"]
    assert isinstance(listed[1], StateError) and "vol1.json" in str(listed[1])


def test_next_generation():
    assert next_generation(None) == 1
    assert next_generation(replace(STATE, generation=4)) == 5


def test_bad_name_is_refused():
    with pytest.raises(ConfigError):
        load_state("../etc/vol0")


def test_truncated_file(directory):
    save_state(STATE, directory)
    path = directory / "vol0.json"
    path.write_bytes(path.read_bytes()[:40])
    message = rejected(directory)
    assert message.startswith(f"{path}: it is not valid JSON (")


@pytest.mark.parametrize("content, problem", [
    (b"", "it is not valid JSON"),
    (b"\xff\xfe garbage", "it is not valid JSON"),
    (b"[]", "it does not hold a JSON object"),
])
def test_not_a_json_object(directory, content, problem):
    directory.mkdir(mode=0o700)
    (directory / "vol0.json").write_bytes(content)
    message = rejected(directory)
    assert problem in message


@pytest.mark.parametrize("change, problem", [
    ({"pid": DELETE}, "missing keys: pid, unknown keys: none"),
    ({"extra": 1}, "missing keys: none, unknown keys: extra"),
    ({"pid": "4242"}, "key 'pid' is \"4242\", expected int"),
    ({"generation": True}, "key 'generation' is true, expected int"),
    ({"params": []}, "key 'params' is [], expected dict"),
    ({"name": "vol1"}, "it names device 'vol1', not 'vol0'"),
    ({"created": "yesterday"}, "Invalid isoformat string: 'yesterday'"),
    ({"updated": "2025-01-31T12:00:00"}, "has no time zone"),
    ({"schema": 0}, "its schema is 0, expected 1"),
    ({"schema": "1"}, "its schema is \"1\", expected 1"),
    ({"schema": True}, "its schema is true, expected 1"),
    ({"schema": None}, "its schema is null, expected 1"),
])
def test_corrupt_content(directory, change, problem):
    data = {key: value for key, value in {**asdict(STATE), **change}.items()
            if value is not DELETE}
    path = write_json(directory, data)
    message = rejected(directory)
    assert message.startswith(f"{path}: ") and problem in message


def test_corrupt_embedded_config(directory):
    data = asdict(STATE)
    data["config"]["queues"] = "many"
    write_json(directory, data)
    assert "config field 'queues' is \"many\", expected int" in rejected(directory)


def test_newer_schema_is_refused(directory):
    path = write_json(directory, {**asdict(STATE), "schema": 2, "new": "key"})
    with pytest.raises(StateError) as caught:
        load_state("vol0", directory)
    assert not isinstance(caught.value, CorruptStateError)  # not rebuilt: serve refuses it
    message = str(caught.value)
    assert message.startswith(f"{path}: written by a newer ublkd (schema 2); "
                              f"this ublkd ({ublkd.__version__}) reads schema 1")


def test_corrupt_file_is_moved_aside(directory):
    save_state(STATE, directory)
    (directory / "vol0.json").write_text("{torn")
    kept = state.quarantine_state("vol0", directory)
    assert kept == directory / "vol0.json.corrupt" and kept.read_text() == "{torn"
    assert load_state("vol0", directory) is None
    assert list_states(directory) == []
