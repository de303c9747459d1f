"""Per-device state: /var/lib/ublkd/NAME.json, what recovery needs after a crash.

The file is written before the device goes live and again for each new
serving process. Writes are atomic (temp file, fsync, rename, fsync of the
directory): a crash at any moment leaves the old file or the new one, never
a torn one. ublksrv truncates and rewrites in place, and a crash in between
loses the only record of the device.

The loader rejects what it does not understand (unknown keys, wrong types,
another schema) instead of guessing, because a wrong guess would serve the
wrong backing file.
"""

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ublkd import __version__
from ublkd.config import DeviceConfig, validate_name
from ublkd.errors import CorruptStateError, StateError

SCHEMA_VERSION = 1
DEFAULT_STATE_DIR = Path("/var/lib/ublkd")
# Temp files are ".NAME.json~XXXXXXXX.tmp": '~' cannot occur in a device
# name, so one device's temp files never match another device's pattern.
_TEMP_MARK = ".json~"
_CORRUPT_SUFFIX = ".json.corrupt"

_JSON_TYPES: dict[str, type] = {
    "schema": int, "name": str, "dev_id": int, "flags": int, "params": dict,
    "config": dict, "pid": int, "generation": int, "created": str, "updated": str,
    "version": str,
}


@dataclass(frozen=True)
class DeviceState:
    """What the kernel accepted for one device and who serves it, as stored in JSON.

    `config` is DeviceConfig.to_dict(): load_state has checked that
    DeviceConfig.from_dict() takes it back. `created` and `updated` are ISO
    8601 UTC, e.g. datetime.now(timezone.utc).isoformat(). `generation`
    counts serving processes (1 at create, +1 per recovery); `version` and
    `schema` describe the ublkd that wrote the file.
    """

    name: str
    dev_id: int
    flags: int
    params: dict[str, Any]
    config: dict[str, Any]
    pid: int
    generation: int
    created: str
    updated: str
    version: str = __version__
    schema: int = SCHEMA_VERSION


def state_dir() -> Path:
    """The state directory: $UBLKD_STATE_DIR if set (tests), else /var/lib/ublkd."""
    return Path(os.environ.get("UBLKD_STATE_DIR") or DEFAULT_STATE_DIR)


def next_generation(previous: DeviceState | None) -> int:
    """The generation of a new serving process: 1 for a new device, else one more."""
    return 1 if previous is None else previous.generation + 1


def save_state(state: DeviceState, directory: Path | None = None) -> None:
    """Atomically replace NAME.json with `state`.

    Also removes this device's temp files left by a crash mid-write; other
    devices' temp files are left alone, as their daemons may be writing.
    One daemon serves a device, so writes of one device do not race.
    """
    validate_name(state.name)
    directory = directory or state_dir()
    target = directory / f"{state.name}.json"
    try:
        _make_private_dir(directory)
        _remove_temp_files(directory, state.name)
        _write_atomically(target, json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
    except OSError as error:
        raise StateError(f"{target}: cannot write the state of device '{state.name}' "
                         f"({error.strerror}); free space or fix the permissions of "
                         f"{directory}, then retry") from None


def load_state(name: str, directory: Path | None = None) -> DeviceState | None:
    """The state of device `name`, or None when it has no state file."""
    validate_name(name)
    directory = directory or state_dir()
    _check_private(directory)
    try:
        return _read(directory / f"{name}.json", name)
    except FileNotFoundError:
        return None


def remove_state(name: str, directory: Path | None = None) -> None:
    """Forget device `name`: its state file, a corrupt one set aside, and any temp
    files; absent is fine."""
    validate_name(name)
    directory = directory or state_dir()
    (directory / f"{name}.json").unlink(missing_ok=True)
    (directory / f"{name}{_CORRUPT_SUFFIX}").unlink(missing_ok=True)
    _remove_temp_files(directory, name)


def quarantine_state(name: str, directory: Path | None = None) -> Path:
    """Move a corrupt NAME.json aside to NAME.json.corrupt (replacing an older
    one), where an admin can look at it and no loader reads it again.  It
    stays until the device is removed (remove_state)."""
    validate_name(name)
    directory = directory or state_dir()
    kept = directory / f"{name}{_CORRUPT_SUFFIX}"
    os.replace(directory / f"{name}.json", kept)
    return kept


def corrupt_state_kept(name: str, directory: Path | None = None) -> bool:
    """Whether a corrupt state file of `name` was set aside: then the device held
    data, and its missing backing file must not be created empty."""
    validate_name(name)
    return ((directory or state_dir()) / f"{name}{_CORRUPT_SUFFIX}").exists()


def list_states(directory: Path | None = None) -> list[DeviceState | StateError]:
    """Every device's state, by name; an unreadable file appears as its StateError
    so that `ublkd list` can show it next to the good ones."""
    directory = directory or state_dir()
    _check_private(directory)
    result: list[DeviceState | StateError] = []
    for path in sorted(directory.glob("*.json")):
        try:
            result.append(_read(path, path.stem))
        except FileNotFoundError:
            continue  # removed since the directory was listed
        except StateError as error:
            result.append(error)
    return result


def _make_private_dir(directory: Path) -> None:
    """Create the state directory with mode 0700 if missing, then check it.

    An existing directory keeps its mode: it may be shared (UBLKD_STATE_DIR
    pointed at /tmp), and chmod'ing it would break others. _check_private
    refuses it instead if others can write to it.
    """
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask
    _check_private(directory)


def _check_private(directory: Path) -> None:
    """Refuse a state directory that group or others can write to.

    ublkd runs as root and serves whatever backing file a state file names,
    so whoever can plant a file there could have root expose any file as a
    block device. Reading by others is harmless (pids, paths, sizes).
    """
    try:
        mode = directory.stat().st_mode
    except FileNotFoundError:
        return
    if mode & 0o022:
        raise StateError(f"{directory}: the state directory is writable by group or others "
                         f"(mode {mode & 0o777:04o}), and ublkd trusts the files in it; "
                         f"run `chmod 700 {directory}` or set UBLKD_STATE_DIR to a private "
                         "directory")


def _remove_temp_files(directory: Path, name: str) -> None:
    """Remove the temp files a crash during save_state left behind for `name`."""
    for path in directory.glob(f".{name}{_TEMP_MARK}*"):
        path.unlink(missing_ok=True)


def _write_atomically(target: Path, text: str) -> None:
    """Write `text` to a temp file next to `target`, fsync it, rename it over `target`
    and fsync the directory so the rename itself survives a power loss."""
    # What tempfile.mkstemp does (random name, O_EXCL, mode 0600), without
    # importing tempfile (shutil, random, bz2, lzma) on the way to every recovery.
    temp = target.parent / f".{target.stem}{_TEMP_MARK}{os.urandom(4).hex()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise
    directory_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def _read(path: Path, name: str) -> DeviceState:
    """Load and check one state file; FileNotFoundError passes through."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except OSError as error:
        raise CorruptStateError(f"{path}: cannot read the state of device '{name}' "
                                f"({error.strerror})") from None
    except ValueError as error:
        raise _corrupt(path, name, f"it is not valid JSON ({error})") from None
    return _parse(path, name, data)


def _parse(path: Path, name: str, data: object) -> DeviceState:
    """A DeviceState from the decoded JSON, or a StateError saying what is wrong."""
    if not isinstance(data, dict):
        raise _corrupt(path, name, "it does not hold a JSON object")
    _check_schema(path, name, data.get("schema"))
    missing = [key for key in _JSON_TYPES if key not in data]
    unknown = sorted(set(data) - set(_JSON_TYPES))
    if missing or unknown:
        raise _corrupt(path, name, f"missing keys: {', '.join(missing) or 'none'}, "
                                   f"unknown keys: {', '.join(unknown) or 'none'}")
    for key, kind in _JSON_TYPES.items():
        if isinstance(data[key], bool) or not isinstance(data[key], kind):
            raise _corrupt(path, name, f"key '{key}' is {json.dumps(data[key])}, "
                                       f"expected {kind.__name__}")
    if data["name"] != name:
        raise _corrupt(path, name, f"it names device '{data['name']}', not '{name}'")
    try:
        DeviceConfig.from_dict(data["config"])
        _check_time(data["created"])
        _check_time(data["updated"])
    except ValueError as error:
        raise _corrupt(path, name, str(error)) from None
    return DeviceState(**data)


def _check_schema(path: Path, name: str, schema: object) -> None:
    """Accept only SCHEMA_VERSION: another schema may mean other keys or meanings."""
    if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA_VERSION:
        raise StateError(
            f"{path}: written by a newer ublkd (schema {schema}); this ublkd ({__version__}) "
            f"reads schema {SCHEMA_VERSION}; serve device '{name}' with the newer ublkd")
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise _corrupt(path, name, f"its schema is {json.dumps(schema)}, "
                                   f"expected {SCHEMA_VERSION}")


def _corrupt(path: Path, name: str, problem: str) -> CorruptStateError:
    """The error for a damaged file.  It does not end the device: serve,
    give-up and delete find the device through the kernel instead."""
    return CorruptStateError(f"{path}: {problem}")


def _check_time(text: str) -> None:
    """ValueError unless `text` is an ISO 8601 time with a zone (a zoneless time is ambiguous)."""
    if datetime.fromisoformat(text).tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
