"""Config parsing and validation: every rule, and what each message tells the user."""

import json
import os
import pwd
import re
import stat
import tomllib
from pathlib import Path

import pytest

from ublkd import config
from ublkd.config import (DeviceConfig, load_config, parse_config, parse_size, trust_problem,
                          validate_name)
from ublkd.errors import ConfigError

SOURCE = Path("/etc/ublkd/vol0.toml")
FILE_BACKEND = 'backend = "file"\npath = "/srv/vol0.img"\n'
NULL_BACKEND = 'backend = "null"\nsize = "1GiB"\n'
NBD_BACKEND = 'backend = "nbd"\nuri = "nbd+unix:///vol?socket=/run/nbd/vol0.sock"\n'


def parse(text: str) -> DeviceConfig:
    return parse_config("vol0", text, SOURCE)


def config_error(text: str) -> str:
    """The message of the ConfigError that `text` raises; every one names the file."""
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: ")
    return message


def test_file_backend_defaults():
    assert parse(FILE_BACKEND) == DeviceConfig(
        name="vol0", backend="file", path=Path("/srv/vol0.img"), size=None, queues=1,
        queue_depth=128, logical_block_size=512, recovery="reissue", dev_id=None,
        on_give_up="delete", source=SOURCE)


def test_every_key_set():
    parsed = parse(FILE_BACKEND + 'size = "2GiB"\nqueues = 4\nqueue_depth = 64\n'
                   'logical_block_size = 4096\nrecovery = "abort"\nid = 7\n'
                   'on_give_up = "keep"\n')
    assert (parsed.size, parsed.queues, parsed.queue_depth, parsed.logical_block_size,
            parsed.recovery, parsed.dev_id, parsed.on_give_up) == (
        2 * 2**30, 4, 64, 4096, "abort", 7, "keep")


def test_null_backend_takes_size_and_no_path():
    parsed = parse(NULL_BACKEND)
    assert (parsed.backend, parsed.path, parsed.size) == ("null", None, 2**30)


@pytest.mark.parametrize("value, expected", [
    ('"1GiB"', 2**30), ('"1G"', 2**30), ('"512MiB"', 512 * 2**20), ('"100M"', 100 * 2**20),
    ('"4096"', 4096), ("4096", 4096), ('"4096B"', 4096), ('"8K"', 8192), ('"8KiB"', 8192),
    ('"2T"', 2 * 2**40), ('"1TiB"', 2**40), ('"1.5 GiB"', 3 * 2**29), ('"1g"', 2**30),
    ('"1KB"', 1000), ('"1MB"', 10**6), ('"1GB"', 10**9), ('"1TB"', 10**12),
])
def test_size_units(value, expected):
    # Decoded by TOML first, so parse_size gets what a file would give it.
    assert parse_size(tomllib.loads(f"size = {value}")["size"], SOURCE, "size") == expected


@pytest.mark.parametrize("value, problem", [
    ('""', "is not a size"), ('"big"', "is not a size"), ('"-1G"', "is not a size"),
    ('"1XB"', 'unknown unit "XB"'), ('"1.3K"', "not a whole number of bytes"),
    ("0", "not greater than 0"), ('"0GiB"', "not greater than 0"), ("-512", "not greater than 0"),
    ("1.5", "is a float"), ("true", "is a boolean"), ("[1]", "is an array"),
])
def test_bad_sizes_say_the_units(value, problem):
    message = config_error(f'backend = "null"\nsize = {value}\n')
    assert f"key 'size' = {value}" in message and problem in message
    assert "K/KiB" in message and "KB" in message and '"1GiB"' in message


@pytest.mark.parametrize("size, block, nearest", [
    ('"1000"', 512, "use 512 or 1024"), ("100", 512, "use 512"),
    ('"6K"', 4096, "use 4096 or 8192"),
])
def test_size_must_be_a_multiple_of_the_block_size(size, block, nearest):
    message = config_error(f'backend = "null"\nsize = {size}\nlogical_block_size = {block}\n')
    assert f"not a multiple of logical_block_size ({block})" in message
    assert message.endswith(nearest)


def test_unknown_key_is_named_with_a_suggestion_and_the_known_keys():
    message = config_error(NULL_BACKEND + "queus = 2\n")
    assert "key 'queus' is unknown; did you mean 'queues'?" in message
    assert "known keys: backend, ceph_conf, client, id, image, io_timeout," in message


def test_tables_are_unknown_keys():
    assert "key 'extra' is unknown" in config_error(NULL_BACKEND + "[extra]\na = 1\n")


@pytest.mark.parametrize("key, value, problem, allowed", [
    ("queues", "0", "is out of range", "use an integer from 1 to 64"),
    ("queues", "65", "is out of range", "use an integer from 1 to 64"),
    ("queues", '"4"', "is a string", "use an integer from 1 to 64"),
    ("queues", "true", "is a boolean", "use an integer from 1 to 64"),
    ("queues", "2.0", "is a float", "use an integer from 1 to 64"),
    ("queue_depth", "4097", "is out of range", "use an integer from 1 to 4096"),
    ("queue_depth", "0", "is out of range", "use an integer from 1 to 4096"),
    ("id", "-1", "is out of range", "use an integer from 0 to 1048575"),
    ("id", "1048576", "is out of range", "use an integer from 0 to 1048575"),
    ("id", "false", "is a boolean", "use an integer from 0 to 1048575"),
    ("logical_block_size", "1000", "is not allowed", "use 512, 1024, 2048 or 4096"),
    ("logical_block_size", '"512"', "is a string", "use 512, 1024, 2048 or 4096"),
    ("logical_block_size", "true", "is a boolean", "use 512, 1024, 2048 or 4096"),
    ("recovery", '"fast"', "is not allowed", 'use "reissue", "abort", "fail_io" or "none"'),
    ("recovery", "1", "is an integer", 'use "reissue", "abort", "fail_io" or "none"'),
    ("on_give_up", '"restart"', "is not allowed", 'use "keep" or "delete"'),
    ("poll_us", "-1", "is out of range", "use an integer from 0 to 100000"),
    ("poll_us", "100001", "is out of range", "use an integer from 0 to 100000"),
    ("poll_us", "0.5", "is a float", "use an integer from 0 to 100000"),
])
def test_bad_values_name_key_value_and_what_is_allowed(key, value, problem, allowed):
    message = config_error(NULL_BACKEND + f"{key} = {value}\n")
    assert message == f"{SOURCE}: key '{key}' = {value} {problem}; {allowed}"


def test_backend_is_required_and_checked():
    assert ("key 'backend' is missing; use \"file\", \"null\", \"nbd\" or \"rbd\""
            in config_error("size = 4096\n"))
    assert "key 'backend' = \"ceph\" is not allowed" in config_error('backend = "ceph"\n')


def test_file_backend_needs_an_absolute_path():
    assert "key 'path' is missing" in config_error('backend = "file"\n')
    message = config_error('backend = "file"\npath = "vol0.img"\n')
    assert "key 'path' = \"vol0.img\" is not absolute" in message and "absolute path" in message
    assert "key 'path' = 3 is an integer" in config_error('backend = "file"\npath = 3\n')


def test_null_backend_refuses_a_path_and_needs_a_size():
    message = config_error(NULL_BACKEND + 'path = "/srv/vol0.img"\n')
    assert "key 'path' is not allowed with backend = \"null\"" in message
    assert "remove it" in message
    message = config_error('backend = "null"\n')
    assert "key 'size' is missing" in message and '"1GiB"' in message


def test_toml_syntax_error_gives_line_and_column():
    message = config_error('backend = "null"\nsize = = 1\n')
    assert "not valid TOML" in message and "line 2" in message and "column" in message


@pytest.mark.parametrize("name", ["vol0", "a", "A-b_c.d", "9" * 64, "db.data-1"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name, problem", [
    ("", "is empty"), ("x" * 65, "is 65 characters long"), ("-vol", "starts with '-'"),
    (".vol", "starts with '.'"), ("_vol", "starts with '_'"), ("a/b", "contains '/'"),
    ("a..b", "contains '..'"), ("vol 0", "contains ' '"), ("vol@0", "contains '@'"),
    ("völ", "contains 'ö'"),
])
def test_invalid_names_explain_the_rule(name, problem):
    with pytest.raises(ConfigError) as caught:
        validate_name(name)
    message = str(caught.value)
    assert f"device name {name!r} is invalid: it {problem}" in message
    assert "ublkd@NAME" in message and "NAME.toml" in message


def test_parse_config_checks_the_name():
    with pytest.raises(ConfigError, match="device name '../x' is invalid"):
        parse_config("../x", NULL_BACKEND, SOURCE)


def test_load_config_reads_from_the_env_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKD_CONF_DIR", str(tmp_path))
    (tmp_path / "vol0.toml").write_text(NULL_BACKEND)
    assert config.conf_dir() == tmp_path
    assert load_config("vol0").source == tmp_path / "vol0.toml"


def test_conf_dir_default(monkeypatch):
    monkeypatch.delenv("UBLKD_CONF_DIR", raising=False)
    assert config.conf_dir() == Path("/etc/ublkd")


def test_missing_config_file_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config("vol0", tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'vol0.toml'}: no config file for device 'vol0'")
    assert "/usr/share/doc/ublkd/examples/vol0.toml" in message
    assert "conf/vol0.toml.example" in message


def test_unreadable_config_files(tmp_path):
    (tmp_path / "bin.toml").write_bytes(b'backend = "\xff"\n')
    with pytest.raises(ConfigError, match="bin.toml: not UTF-8"):
        load_config("bin", tmp_path)
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="dir.toml: cannot read it"):
        load_config("dir", tmp_path)


def test_load_config_refuses_a_bad_name_before_touching_files(tmp_path):
    (tmp_path / "x.toml").write_text(NULL_BACKEND)
    with pytest.raises(ConfigError, match="invalid"):
        load_config("../" + tmp_path.name + "/x", tmp_path)


@pytest.mark.parametrize("text", [FILE_BACKEND, NULL_BACKEND + "id = 3\n",
                                  NBD_BACKEND + "poll_us = 2000\n"])
def test_dict_round_trip_through_json(text):
    parsed = parse(text)
    data = json.loads(json.dumps(parsed.to_dict()))
    assert DeviceConfig.from_dict(data) == parsed


@pytest.mark.parametrize("change, problem", [
    ({"queues": "1"}, "config field 'queues' is \"1\", expected int"),
    ({"queues": True}, "config field 'queues' is true"),
    ({"path": 5}, "config field 'path' is 5"),
    ({"extra": 1}, "config fields missing: none, unknown: extra"),
])
def test_from_dict_rejects_what_to_dict_never_writes(change, problem):
    data = {**parse(FILE_BACKEND).to_dict(), **change}
    with pytest.raises(ValueError, match=re.escape(problem)):
        DeviceConfig.from_dict(data)


def test_from_dict_rejects_a_missing_field():
    data = parse(FILE_BACKEND).to_dict()
    del data["queues"]
    with pytest.raises(ValueError, match="config fields missing: queues, unknown: none"):
        DeviceConfig.from_dict(data)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536 * 1024, "1.5 MiB"),
    (2**30, "1 GiB"), (2**30 + 2**20, "1 GiB"), (3 * 2**40, "3 TiB"), (2**50, "1024 TiB"),
])
def test_format_size(n, text):
    assert config.format_size(n) == text


# -- trust: a config another user can change is refused ----------------------------
def stat_of(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("mode, uid, is_directory", [
    (stat.S_IFREG | 0o644, 0, False), (stat.S_IFREG | 0o600, 0, False),
    (stat.S_IFREG | 0o644, 1000, False),  # the running user's own file
    (stat.S_IFDIR | 0o755, 0, True), (stat.S_IFDIR | 0o1777, 0, True),  # sticky, like /tmp
])
def test_trusted_files_and_directories(mode, uid, is_directory):
    assert trust_problem(stat_of(mode, uid), euid=1000, is_directory=is_directory) is None


@pytest.mark.parametrize("mode, uid, is_directory, problem", [
    (stat.S_IFREG | 0o664, 0, False, "is writable by its group (mode 0664, owner uid 0 (root))"),
    (stat.S_IFREG | 0o646, 0, False, "is writable by others (mode 0646"),
    (stat.S_IFREG | 0o666, 0, False, "is writable by its group and others (mode 0666"),
    (stat.S_IFREG | 0o644, 65534, False, "is owned by uid 65534 (nobody), not by root "
                                         "(mode 0644)"),
    (stat.S_IFREG | 0o1666, 0, False, "is writable by its group and others"),  # files: no sticky
    (stat.S_IFDIR | 0o775, 0, True, "is writable by its group (mode 0775"),
    (stat.S_IFDIR | 0o1777, 65534, True, "is owned by uid 65534"),
])
def test_untrusted_files_and_directories(mode, uid, is_directory, problem):
    assert trust_problem(stat_of(mode, uid), euid=0, is_directory=is_directory) \
        .startswith(problem)


def test_owner_may_be_the_running_user_only_when_it_is_named():
    assert "not by root or uid 1000" in trust_problem(stat_of(stat.S_IFREG | 0o644, 1001),
                                                      euid=1000)


def test_group_writable_config_is_refused_with_the_fix(tmp_path):
    source = tmp_path / "vol0.toml"
    source.write_text(NULL_BACKEND)
    source.chmod(0o664)
    with pytest.raises(ConfigError) as caught:
        load_config("vol0", tmp_path)
    assert str(caught.value) == (
        f"{source}: refusing to read it: it is writable by its group (mode 0664, owner "
        f"{owner_of(source)}); a user who can change it could make root serve any file or "
        f"disk. Fix: chown root:root {source}; chmod go-w {source}")
    source.chmod(0o644)
    assert load_config("vol0", tmp_path).backend == "null"


def test_writable_directory_is_refused_even_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (real / "vol0.toml").write_text(NULL_BACKEND)
    (tmp_path / "conf").symlink_to(real)
    real.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        load_config("vol0", tmp_path / "conf")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'conf' / 'vol0.toml'}: refusing to read it: its "
                              f"directory {real} is writable by its group and others (mode "
                              f"0777"), message
    assert message.endswith(f"Fix: chown root:root {real}; chmod go-w {real}")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_config_owned_by_another_user_is_refused(tmp_path):
    source = tmp_path / "vol0.toml"
    source.write_text(NULL_BACKEND)
    os.chown(source, 65534, 65534)
    with pytest.raises(ConfigError, match=r"vol0.toml: refusing to read it: it is owned by "
                                          r"uid 65534 .*, not by root \(mode 0644\)"):
        load_config("vol0", tmp_path)


def owner_of(path: Path) -> str:
    uid = path.stat().st_uid
    return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"


def test_nbd_backend_defaults():
    parsed = parse(NBD_BACKEND)
    assert (parsed.backend, parsed.uri, parsed.reconnect_timeout, parsed.read_only,
            parsed.path, parsed.size) == (
        "nbd", "nbd+unix:///vol?socket=/run/nbd/vol0.sock", 60.0, False, None, None)


@pytest.mark.parametrize("uri", [
    "nbd://server.example/vol", "nbd://127.0.0.1:10810/vol", "nbd://[::1]:10809/",
    "nbd://host", "nbd+unix:///?socket=/run/x.sock", "nbd+unix://?socket=/run/x.sock",
])
def test_nbd_uris_ublkd_can_use(uri):
    assert parse(f'backend = "nbd"\nuri = "{uri}"\n').uri == uri


@pytest.mark.parametrize("uri, problem", [
    ("nbds://host/vol", "asks for TLS, which ublkd does not support yet"),
    ("nbds+unix:///?socket=/run/x.sock", "asks for TLS"),
    ("nbd+vsock://2/vol", 'has the scheme "nbd+vsock"'),
    ("http://host/vol", 'has the scheme "http"'),
    ("nbd://user@host/vol", "names a user"),
    ("nbd:///vol", "names no host"),
    ("nbd://host/vol?tls=off", "has query keys (tls)"),
    ("nbd://host:99999/vol", "is not a valid URI"),
    ("nbd+unix:///vol", "needs exactly one absolute socket path"),
    ("nbd+unix:///vol?socket=run/x.sock", "needs exactly one absolute socket path"),
    ("nbd+unix:///vol?socket=/a&socket=/b", "needs exactly one absolute socket path"),
    ("nbd+unix://host/vol?socket=/run/x.sock", 'names a host ("host")'),
    ("nbd+unix:///vol?socket=/run/x.sock&tls-certificates=/x",
     "has query keys other than socket (tls-certificates)"),
])
def test_nbd_uris_ublkd_refuses_say_why_and_how(uri, problem):
    message = config_error(f'backend = "nbd"\nuri = "{uri}"\n')
    assert f"key 'uri' = \"{uri}\" {problem}" in message and "nbd+unix:///" in message


def test_nbd_backend_needs_a_uri_and_refuses_a_path():
    assert "key 'uri' is missing" in config_error('backend = "nbd"\n')
    message = config_error(NBD_BACKEND + 'path = "/srv/vol0.img"\n')
    assert "key 'path' is not allowed with backend = \"nbd\", which has its export" in message


@pytest.mark.parametrize("key, value", [("uri", '"nbd://host/vol"'),
                                        ("reconnect_timeout", "5"), ("read_only", "true")])
def test_nbd_keys_are_refused_for_other_backends(key, value):
    message = config_error(f"{FILE_BACKEND}{key} = {value}\n")
    assert f"key '{key}' is only for backend = \"nbd\"; remove it" in message


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("2.5", 2.5), ("3600", 3600.0)])
def test_reconnect_timeout(value, expected):
    assert parse(NBD_BACKEND + f"reconnect_timeout = {value}\n").reconnect_timeout == expected


@pytest.mark.parametrize("value, problem", [("-1", "is out of range"), ('"60"', "is a string"),
                                            ("true", "is a boolean"), ("1e12", "out of range")])
def test_bad_reconnect_timeouts(value, problem):
    message = config_error(NBD_BACKEND + f"reconnect_timeout = {value}\n")
    assert problem in message and "0: hold I/O until the server is back" in message


@pytest.mark.parametrize("text", [FILE_BACKEND, NULL_BACKEND, NBD_BACKEND])
def test_poll_us_is_off_unless_set_and_takes_every_backend(text):
    assert parse(text).poll_us == 0
    assert parse(text + "poll_us = 1000\n").poll_us == 1000


def test_read_only_is_a_boolean():
    assert parse(NBD_BACKEND + "read_only = true\n").read_only is True
    assert "key 'read_only' = 1 is an integer; use true or false" in config_error(
        NBD_BACKEND + "read_only = 1\n")


def test_nbd_config_round_trips_through_json():
    parsed = parse(NBD_BACKEND + "reconnect_timeout = 0\nread_only = true\n")
    assert DeviceConfig.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


def test_state_files_of_ublkd_0_1_lack_the_nbd_fields_and_still_load():
    data = parse(FILE_BACKEND).to_dict()
    data.pop("zero_copy", None)
    assert not {"uri", "reconnect_timeout", "read_only", "pool", "image", "poll_us"} & set(data)
    assert DeviceConfig.from_dict(data) == parse(FILE_BACKEND)


def test_an_rbd_config_keeps_its_keys_in_the_state_file():
    config = parse('backend = "rbd"\npool = "rbd"\nimage = "vol0"\nclient = "ublkd"\n')
    data = json.loads(json.dumps(config.to_dict()))
    assert data["pool"] == "rbd" and data["ceph_conf"] == "/etc/ceph/ceph.conf"
    assert DeviceConfig.from_dict(data) == config
    assert config.rbd_spec == "rbd/vol0" and config.io_timeout == 0.0


@pytest.mark.parametrize("text, problem", [
    ('backend = "rbd"\nimage = "vol0"\n', "key 'pool' is missing"),
    ('backend = "rbd"\npool = "rbd"\n', "key 'image' is missing"),
    ('backend = "rbd"\npool = "rbd"\nimage = "a/b"\n', "is not a Ceph name"),
    ('backend = "rbd"\npool = "rbd"\nimage = "v"\nsnapshot = "s"\n', "add read_only = true"),
    ('backend = "rbd"\npool = "rbd"\nimage = "v"\nclient = "client.admin"\n',
     'without "client."'),
    ('backend = "rbd"\npool = "rbd"\nimage = "v"\nkeyring = "k"\n', "not an absolute path"),
    ('backend = "rbd"\npool = "rbd"\nimage = "v"\nio_timeout = -1\n', "out of range"),
    ('backend = "null"\nsize = 4096\npool = "rbd"\n', "only for backend = \"rbd\""),
])
def test_bad_rbd_keys_are_named(text, problem):
    assert problem in config_error(text)


def test_from_dict_rejects_a_read_only_that_is_not_a_boolean():
    data = {**parse(NBD_BACKEND).to_dict(), "read_only": 1}
    with pytest.raises(ValueError, match="config field 'read_only' is 1, expected bool"):
        DeviceConfig.from_dict(data)
