"""Device config: /etc/ublkd/NAME.toml, parsed and validated into a DeviceConfig.

Everything is checked here, before any kernel object exists, so that a
mistake in the file shows up as one message naming the file, the key, the
value given and what is allowed, never as an errno from the kernel later.

A config says which file or disk root serves read-write, so it is read
only when no other user can change it (check_trusted), as sshd does with
its keys: the file and every directory above it belong to root (or to
the user running ublkd) and are not writable by group or others.
"""

import json
import os
import re
import stat
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

from ublkd.errors import ConfigError

DEFAULT_CONF_DIR = Path("/etc/ublkd")
EXAMPLE_CONFIG = "/usr/share/doc/ublkd/examples/vol0.toml"
SOURCE_EXAMPLE_CONFIG = "conf/vol0.toml.example"

KNOWN_KEYS = (
    "backend", "ceph_conf", "client", "id", "image", "io_timeout", "keyring",
    "logical_block_size", "namespace", "on_give_up", "path", "poll_us", "pool", "queue_depth",
    "queues", "read_only", "reconnect_timeout", "recovery", "size", "snapshot", "uri",
    "zero_copy",
)
BACKENDS = ("file", "null", "nbd", "rbd")
RBD_KEYS = ("pool", "image", "namespace", "snapshot", "ceph_conf", "client", "keyring",
            "io_timeout")
# Config fields newer than the state files of ublkd 0.1, with the value
# those devices were created with: from_dict fills them in, and to_dict
# leaves them out while they have it (an older ublkd then still reads the
# state file of a device that does not use them).
LATER_FIELDS = {"uri": None, "reconnect_timeout": None, "read_only": False, "zero_copy": True,
                "poll_us": 0, **dict.fromkeys(RBD_KEYS)}
DEFAULT_RECONNECT_TIMEOUT = 60.0
DEFAULT_CEPH_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CEPH_CLIENT = "admin"
# Ceph's pool, namespace, image and snapshot names: no '/' or '@' (the
# separators of "pool/namespace/image@snapshot"), no control characters.
_CEPH_NAME = re.compile(r"[^/@\x00-\x1f]+")
_CEPH_CLIENT = re.compile(r"[A-Za-z0-9_.-]+")
MAX_RECONNECT_TIMEOUT = 365 * 86400.0
NBD_URI_HELP = ('use "nbd://HOST[:PORT]/EXPORT" or "nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH", '
                'e.g. "nbd+unix:///?socket=/run/qemu-nbd/vol0.sock"')
RECOVERY_MODES = ("reissue", "abort", "fail_io", "none")
GIVE_UP_ACTIONS = ("keep", "delete")
BLOCK_SIZES = (512, 1024, 2048, 4096)
MAX_QUEUES = 64
MAX_QUEUE_DEPTH = 4096
# The kernel numbers ublk devices below UBLK_MAX_UBLKS (1 << 20, its minor space).
MAX_DEV_ID = 2**20 - 1
# A queue thread polls at most this long (100 ms) after a completion before it
# sleeps; longer only burns CPU after the I/O has stopped.
MAX_POLL_US = 100_000

NAME_MAX = 64
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "B": 1,
    "K": 2**10, "KIB": 2**10, "M": 2**20, "MIB": 2**20,
    "G": 2**30, "GIB": 2**30, "T": 2**40, "TIB": 2**40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}
_SIZE_HELP = (
    'use an integer number of bytes or a string with a unit: B, K/KiB, M/MiB, '
    'G/GiB, T/TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. "1GiB"'
)
_FORMAT_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
          list: "an array", dict: "a table"}

Choice = TypeVar("Choice", str, int)


@dataclass(frozen=True)
class DeviceConfig:
    """One device's validated config; `source` is the file it came from."""

    name: str
    backend: str
    path: Path | None
    size: int | None
    queues: int
    queue_depth: int
    logical_block_size: int
    recovery: str
    dev_id: int | None
    on_give_up: str
    source: Path
    uri: str | None = None  # backend "nbd": the export's NBD URI
    reconnect_timeout: float | None = None  # backend "nbd": seconds; 0 = forever
    read_only: bool = False
    zero_copy: bool = True  # backend "file": UBLK_F_AUTO_BUF_REG where the kernel has it
    poll_us: int = 0  # microseconds a queue thread polls after a completion; 0 = never
    # backend "rbd" (docs/rbd.md): the image, and who opens it
    pool: str | None = None
    image: str | None = None
    namespace: str | None = None
    snapshot: str | None = None  # served read-only
    ceph_conf: str | None = None
    client: str | None = None  # the cephx id: client.<client>
    keyring: str | None = None  # None: where ceph_conf says
    io_timeout: float | None = None  # seconds a cluster request may take; 0 = forever

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly copy, kept in the state file so recovery serves what was created."""
        data = {key: value for key, value in asdict(self).items()
                if key not in LATER_FIELDS or value != LATER_FIELDS[key]}
        data["path"] = None if self.path is None else str(self.path)
        data["source"] = str(self.source)
        return data

    @property
    def rbd_spec(self) -> str:
        return rbd_spec(self.pool, self.namespace, self.image, self.snapshot)


    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "DeviceConfig":
        """Rebuild what to_dict() made.

        Raises ValueError saying which field is missing or of the wrong type;
        the state loader adds the file's path and the fix.
        """
        names = {field.name for field in fields(cls)}
        data = {**LATER_FIELDS, **data}
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"config fields missing: {', '.join(missing) or 'none'}, "
                             f"unknown: {', '.join(unknown) or 'none'}")
        values = dict(data)
        for key in ("path", "source"):
            if isinstance(values[key], str):
                values[key] = Path(values[key])
        config = cls(**values)
        for field in fields(cls):
            value = getattr(config, field.name)
            if field.type is bool:
                wrong = not isinstance(value, bool)
            else:
                wrong = isinstance(value, bool) or not isinstance(value, field.type)
            if wrong:
                raise ValueError(f"config field '{field.name}' is {_show(data[field.name])}, "
                                 f"expected {getattr(field.type, '__name__', field.type)}")
        return config


def rbd_spec(pool: str | None, namespace: str | None, image: str | None,
             snapshot: str | None) -> str:
    """An image as the rbd tool names it: pool[/namespace]/image[@snapshot]."""
    spec = "/".join(part for part in (pool, namespace, image) if part)
    return f"{spec}@{snapshot}" if snapshot else spec


def conf_dir() -> Path:
    """The config directory: $UBLKD_CONF_DIR if set (tests, trying things out), else /etc/ublkd."""
    return Path(os.environ.get("UBLKD_CONF_DIR") or DEFAULT_CONF_DIR)


def validate_name(name: str) -> str:
    """Return `name` if it can name a device, else raise ConfigError saying why.

    The name becomes the systemd instance ublkd@NAME and the file names
    NAME.toml and NAME.json, so it must be safe as both: no '/', no '..'.
    """
    problem = name_problem(name)
    if problem:
        raise ConfigError(
            f"device name {name!r} is invalid: {problem}; the name is the systemd instance "
            f"ublkd@NAME and the config file NAME.toml, so use 1 to {NAME_MAX} letters, "
            "digits, '_', '.' or '-', starting with a letter or digit, e.g. vol0")
    return name


def name_problem(name: str) -> str | None:
    """What is wrong with a device name, or None."""
    if not name:
        return "it is empty"
    if len(name) > NAME_MAX:
        return f"it is {len(name)} characters long"
    if not (name[0].isascii() and name[0].isalnum()):
        return f"it starts with {name[0]!r}"
    bad = sorted(set(_NAME_CHARS.sub("", name)))
    if bad:
        return f"it contains {', '.join(map(repr, bad))}"
    if ".." in name:
        return "it contains '..'"
    return None


def load_config(name: str, directory: Path | None = None) -> DeviceConfig:
    """Read and validate NAME.toml from `directory` (default: conf_dir()), once
    check_trusted found it safe from other users."""
    validate_name(name)
    source = (directory or conf_dir()) / f"{name}.toml"
    try:
        with open(source, "rb") as file:
            # fstat of the open file: the file checked is the file read.
            check_trusted(source, os.fstat(file.fileno()))
            text = file.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no config file for device '{name}'; create one, e.g. copy "
            f"{EXAMPLE_CONFIG} ({SOURCE_EXAMPLE_CONFIG} in the source tree) to {source} "
            "and set its path and size") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start}); "
                          "TOML files must be UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{source}: cannot read it ({error.strerror}); "
                          "check that it is a file readable by root") from None
    return parse_config(name, text, source)


def check_trusted(source: Path, file_info: os.stat_result) -> None:
    """Raise ConfigError unless the config `source` (whose fstat is `file_info`)
    and every directory above it are safe from users other than root and us.

    A user who can change the file, or rename or replace it through a
    directory, could make root serve any file or disk read-write.  Both
    the directories above the path as written and above its real path
    (symlinks resolved) count: a link is as safe as the directory it is in.
    """
    euid = os.geteuid()
    problem = trust_problem(file_info, euid)
    if problem:
        raise _untrusted(source, source, problem)
    for directory in _directories_above(source):
        problem = trust_problem(os.stat(directory), euid, is_directory=True)
        if problem:
            raise _untrusted(source, directory, f"its directory {directory} {problem}")


def trust_problem(info: os.stat_result, euid: int, is_directory: bool = False) -> str | None:
    """Why another user could change this file or directory, or None.

    Owned by root or by `euid`, and not writable by group or others; a
    directory with the sticky bit (like /tmp) may be writable by all, since
    nobody can rename or remove what they do not own there.
    """
    owner = info.st_uid
    mode = stat.S_IMODE(info.st_mode)
    if owner not in (0, euid):
        trusted = "root" if euid == 0 else f"root or {_user_name(euid)}"
        return f"is owned by {_user_name(owner)}, not by {trusted} (mode {mode:04o})"
    writable = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                if mode & bit]
    if writable and not (is_directory and mode & stat.S_ISVTX):
        return (f"is writable by {' and '.join(writable)} (mode {mode:04o}, owner "
                f"{_user_name(owner)})")
    return None


def _directories_above(source: Path) -> list[Path]:
    """The directories above `source` as written and above its real path, each
    once and by its real path (the one to chmod)."""
    written = Path(os.path.abspath(source)).parents
    real = Path(os.path.realpath(source)).parents
    return list(dict.fromkeys(Path(os.path.realpath(path)) for path in [*written, *real]))


def _untrusted(source: Path, culprit: Path, problem: str) -> ConfigError:
    """The one shape of the refusal: the config, what is wrong with which path, the fix."""
    return ConfigError(
        f"{source}: refusing to read it: {'it ' if culprit == source else ''}{problem}; a user "
        f"who can change it could make root serve any file or disk. Fix: "
        f"chown root:root {culprit}; chmod go-w {culprit}")


def _user_name(uid: int) -> str:
    """'uid 1000 (alice)', or just the uid when no user has it."""
    import pwd  # only for this message: not on the path of every start

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def parse_config(name: str, text: str, source: Path) -> DeviceConfig:
    """Validate the TOML `text` of device `name`; `source` names the file in messages."""
    validate_name(name)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    _check_keys(table, source)
    backend = _choice(table, "backend", BACKENDS, None, source)
    block_size = _choice(table, "logical_block_size", BLOCK_SIZES, 512, source)
    return DeviceConfig(
        name=name,
        backend=backend,
        path=_backing_path(table, backend, source),
        size=_device_size(table, backend, block_size, source),
        queues=_integer(table, "queues", 1, MAX_QUEUES, 1, source),
        queue_depth=_integer(table, "queue_depth", 1, MAX_QUEUE_DEPTH, 128, source),
        logical_block_size=block_size,
        recovery=_choice(table, "recovery", RECOVERY_MODES, "reissue", source),
        dev_id=_integer(table, "id", 0, MAX_DEV_ID, None, source),
        on_give_up=_choice(table, "on_give_up", GIVE_UP_ACTIONS, "delete", source),
        source=source,
        uri=_nbd_uri(table, backend, source),
        reconnect_timeout=_reconnect_timeout(table, backend, source),
        read_only=_read_only(table, backend, source),
        zero_copy=_zero_copy(table, backend, source),
        poll_us=_integer(table, "poll_us", 0, MAX_POLL_US, 0, source),
        **_rbd_keys(table, backend, source),
    )


def parse_size(value: object, source: Path, key: str) -> int:
    """Bytes from an integer or a string like "1GiB", "100M", "1.5 GiB" or "4096".

    Units are binary like truncate(1) (K = KiB = 1024), KB/MB/GB/TB are
    decimal; case does not matter. The result must be a whole number > 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _invalid(source, key, value, f"is {_kind(value)}", _SIZE_HELP)
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.fullmatch(value)
        if not match:
            raise _invalid(source, key, value, "is not a size", _SIZE_HELP)
        number, unit = match.groups()
        if unit.upper() not in _SIZE_UNITS:
            raise _invalid(source, key, value, f'has an unknown unit "{unit}"', _SIZE_HELP)
        # Exact decimal arithmetic in integers: "1.5" KiB is 15 * 1024 / 10.
        # (fractions.Fraction would import decimal, on the path of every start.)
        whole, _, decimals = number.partition(".")
        scaled = int(whole + decimals) * _SIZE_UNITS[unit.upper()]
        if scaled % 10 ** len(decimals):
            raise _invalid(source, key, value, "is not a whole number of bytes", _SIZE_HELP)
        size = scaled // 10 ** len(decimals)
    if size <= 0:
        raise _invalid(source, key, value, "is not greater than 0", _SIZE_HELP)
    return size


def format_size(n: int) -> str:
    """A size for people: "512 B", "1 GiB", "1.5 MiB" (two decimals at most)."""
    exponent = 0
    while exponent < len(_FORMAT_UNITS) - 1 and n >= 1024 ** (exponent + 1):
        exponent += 1
    number = f"{n / 1024 ** exponent:.2f}".rstrip("0").rstrip(".")
    return f"{number} {_FORMAT_UNITS[exponent]}"


def _check_keys(table: dict[str, object], source: Path) -> None:
    """Reject unknown keys: a typo must not silently fall back to a default."""
    for key in table:
        if key not in KNOWN_KEYS:
            import difflib  # only for this message: not on the path of every start

            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{source}: key '{key}' is unknown; {hint}"
                              f"known keys: {', '.join(KNOWN_KEYS)}")


def _choice(table: dict[str, object], key: str, choices: tuple[Choice, ...],
            default: Choice | None, source: Path) -> Choice:
    """The value of `key`, one of `choices`; a default of None means the key is required."""
    value = table.get(key, default)
    allowed = f"use {_alternatives(choices)}"
    if value is None:
        raise ConfigError(f"{source}: key '{key}' is missing; {allowed}")
    if type(value) is not type(choices[0]):
        raise _invalid(source, key, value, f"is {_kind(value)}", allowed)
    if value not in choices:
        raise _invalid(source, key, value, "is not allowed", allowed)
    return value


def _integer(table: dict[str, object], key: str, low: int, high: int, default: int | None,
             source: Path) -> int | None:
    """The integer value of `key` within low..high, or `default` when absent."""
    value = table.get(key, default)
    allowed = f"use an integer from {low} to {high}"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(source, key, value, f"is {_kind(value)}", allowed)
    if not low <= value <= high:
        raise _invalid(source, key, value, "is out of range", allowed)
    return value


def _backing_path(table: dict[str, object], backend: str, source: Path) -> Path | None:
    """The absolute path of the backing file: required for "file", refused for the others."""
    value = table.get("path")
    if backend != "file":
        if value is not None:
            has = "its export in 'uri'" if backend == "nbd" else "no backing file"
            raise ConfigError(f'{source}: key \'path\' is not allowed with backend = '
                              f'"{backend}", which has {has}; remove it or use '
                              f'backend = "file"')
        return None
    allowed = 'use the absolute path of the backing file or block device, e.g. "/srv/vol0.img"'
    if value is None:
        raise ConfigError(f'{source}: key \'path\' is missing, and backend = "file" needs it; '
                          f"{allowed}")
    if not isinstance(value, str):
        raise _invalid(source, "path", value, f"is {_kind(value)}", allowed)
    if not os.path.isabs(value):
        raise _invalid(source, "path", value,
                       "is not absolute (the daemon runs in / under systemd)", allowed)
    return Path(value)


def _only_for_nbd(table: dict[str, object], key: str, backend: str, source: Path) -> None:
    """Refuse an NBD key in another backend's config: it would do nothing there."""
    if backend != "nbd" and key in table:
        raise ConfigError(f"{source}: key '{key}' is only for backend = \"nbd\"; remove it")


def _nbd_uri(table: dict[str, object], backend: str, source: Path) -> str | None:
    """The NBD URI of the export: required for "nbd", refused for the others.

    Checked without touching the network: the scheme (TLS is not supported
    yet), a host or an absolute socket path, and nothing libnbd would
    read from the URI that ublkd does not control (a user, query keys
    other than `socket`).
    """
    _only_for_nbd(table, "uri", backend, source)
    if backend != "nbd":
        return None
    value = table.get("uri")
    if value is None:
        raise ConfigError(f'{source}: key \'uri\' is missing, and backend = "nbd" needs it; '
                          f"{NBD_URI_HELP}")
    if not isinstance(value, str):
        raise _invalid(source, "uri", value, f"is {_kind(value)}", NBD_URI_HELP)
    problem = nbd_uri_problem(value)
    if problem:
        raise _invalid(source, "uri", value, problem, NBD_URI_HELP)
    return value


def nbd_uri_problem(uri: str) -> str | None:
    """What ublkd cannot use in an NBD URI, or None."""
    from urllib.parse import parse_qs, urlsplit  # only for nbd configs

    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as error:
        return f"is not a valid URI ({error})"
    if parts.scheme in ("nbds", "nbds+unix"):
        return "asks for TLS, which ublkd does not support yet"
    if parts.scheme not in ("nbd", "nbd+unix"):
        return f'has the scheme "{parts.scheme}", not nbd or nbd+unix'
    if parts.username is not None:
        return "names a user (that is for TLS, which ublkd does not support yet)"
    if parts.fragment:
        return "has a fragment (#...)"
    query = parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "nbd":
        if not parts.hostname:
            return "names no host"
        if query:
            return f"has query keys ({', '.join(sorted(query))}); nbd:// takes none"
        if port == 0:
            return "has port 0"
        return None
    if parts.netloc:
        return f'names a host ("{parts.netloc}"); nbd+unix:// takes a socket path instead'
    sockets = query.pop("socket", [])
    if query:
        return f"has query keys other than socket ({', '.join(sorted(query))})"
    if len(sockets) != 1 or not os.path.isabs(sockets[0]):
        return "needs exactly one absolute socket path (?socket=/run/...)"
    return None


def _reconnect_timeout(table: dict[str, object], backend: str, source: Path) -> float | None:
    """Seconds the NBD backend holds I/O while it reconnects; 0 means forever."""
    _only_for_nbd(table, "reconnect_timeout", backend, source)
    if backend != "nbd":
        return None
    return _seconds(table, "reconnect_timeout", DEFAULT_RECONNECT_TIMEOUT,
                    "hold I/O until the server is back, however long", source)


def _read_only(table: dict[str, object], backend: str, source: Path) -> bool:
    """Whether the device is read-only (an NBD export or an RBD snapshot may be)."""
    if backend != "rbd":
        _only_for_nbd(table, "read_only", backend, source)
    value = table.get("read_only", False)
    if not isinstance(value, bool):
        raise _invalid(source, "read_only", value, f"is {_kind(value)}", "use true or false")
    if backend == "rbd" and "snapshot" in table and not value:
        raise ConfigError(f"{source}: key 'snapshot' serves a snapshot, which is read-only; "
                          f"add read_only = true, or remove 'snapshot' to serve the image")
    return value


def _rbd_keys(table: dict[str, object], backend: str, source: Path) -> dict[str, object]:
    """The rbd backend's keys: pool and image required, the rest with Ceph's defaults."""
    if backend != "rbd":
        for key in RBD_KEYS:
            if key in table:
                raise ConfigError(f"{source}: key '{key}' is only for backend = \"rbd\"; "
                                  f"remove it")
        return {}
    keys = {key: _ceph_name(table, key, required=key in ("pool", "image"), source=source)
            for key in ("pool", "image", "namespace", "snapshot")}
    client = table.get("client", DEFAULT_CEPH_CLIENT)
    if (not isinstance(client, str) or not _CEPH_CLIENT.fullmatch(client)
            or client.startswith("client.")):
        raise _invalid(source, "client", client, "is not a cephx id",
                       'use the id without "client.", e.g. "admin" or "ublkd"')
    return {**keys, "client": client,
            "ceph_conf": _absolute_file(table, "ceph_conf", DEFAULT_CEPH_CONF, source),
            "keyring": _absolute_file(table, "keyring", None, source),
            "io_timeout": _seconds(table, "io_timeout", 0.0,
                                   "wait for the cluster however long", source)}


def _ceph_name(table: dict[str, object], key: str, required: bool, source: Path) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise ConfigError(f'{source}: key \'{key}\' is missing, and backend = "rbd" '
                              f'needs it; e.g. pool = "rbd" and image = "vol0"')
        return None
    if not isinstance(value, str) or not _CEPH_NAME.fullmatch(value):
        raise _invalid(source, key, value, "is not a Ceph name",
                       "use a name without '/', '@' or control characters, e.g. \"vol0\"")
    return value


def _absolute_file(table: dict[str, object], key: str, default: str | None,
                   source: Path) -> str | None:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise _invalid(source, key, value, "is not an absolute path",
                       'use a path like "/etc/ceph/ceph.conf"')
    return value


def _seconds(table: dict[str, object], key: str, default: float, zero_means: str,
             source: Path) -> float:
    """A number of seconds from 0 (whose meaning `zero_means` says) to a year."""
    value = table.get(key, default)
    allowed = (f"use a number of seconds from 0 to {MAX_RECONNECT_TIMEOUT:.0f} "
               f"(0: {zero_means})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(source, key, value, f"is {_kind(value)}", allowed)
    if not 0 <= value <= MAX_RECONNECT_TIMEOUT:
        raise _invalid(source, key, value, "is out of range", allowed)
    return float(value)


def _zero_copy(table: dict[str, object], backend: str, source: Path) -> bool:
    """Whether a file device moves data without copying it through ublkd
    (UBLK_F_AUTO_BUF_REG, Linux 6.16+; elsewhere it has no effect)."""
    if backend != "file" and "zero_copy" in table:
        raise ConfigError(f"{source}: key 'zero_copy' is only for backend = \"file\"; "
                          f"remove it")
    value = table.get("zero_copy", True)
    if not isinstance(value, bool):
        raise _invalid(source, "zero_copy", value, f"is {_kind(value)}", "use true or false")
    return value


def _device_size(table: dict[str, object], backend: str, block_size: int,
                 source: Path) -> int | None:
    """The size in bytes, a multiple of the block size; None lets "file" use the file's size."""
    value = table.get("size")
    if value is None:
        if backend == "null":
            raise ConfigError(f'{source}: key \'size\' is missing; backend = "null" has no '
                              f'file to take its size from; {_SIZE_HELP}')
        return None
    size = parse_size(value, source, "size")
    if size % block_size:
        lower = size - size % block_size
        nearest = [n for n in (lower, lower + block_size) if n > 0]
        raise _invalid(source, "size", value,
                       f"({size} bytes) is not a multiple of logical_block_size ({block_size})",
                       f"use {_alternatives(tuple(nearest))}")
    return size


def _invalid(source: Path, key: str, value: object, problem: str, allowed: str) -> ConfigError:
    """The one shape of a bad-value message: file, key, value given, problem, what is allowed."""
    return ConfigError(f"{source}: key '{key}' = {_show(value)} {problem}; {allowed}")


def _show(value: object) -> str:
    """`value` roughly as it was written in TOML (strings quoted, booleans lower case)."""
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _kind(value: object) -> str:
    """The TOML type of `value`, for "is a string" messages."""
    return _KINDS.get(type(value), "a date/time")


def _alternatives(choices: tuple[Choice, ...]) -> str:
    """'"a", "b" or "c"': the allowed values as they would be written in TOML."""
    shown = [_show(choice) for choice in choices]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
