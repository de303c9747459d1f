"""What a failed NBD handshake tells the user, and which exit it leads to
(a configuration error: no restarts; an unreachable server: systemd retries)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ublkd.backends.nbd import probe_error
from ublkd.config import parse_config
from ublkd.errors import BackendError, ConfigError

URI = "nbd+unix:///vol?socket=/run/nbd.sock"


def config():
    return parse_config("vol0", f'backend = "nbd"\nuri = "{URI}"\n',
                        Path("/etc/ublkd/vol0.toml"))


@pytest.mark.parametrize("number, message, kind, words", [
    (errno.ECONNREFUSED, "connect: Connection refused", BackendError, "is it running?"),
    (errno.ENOENT, "connect: No such file or directory", BackendError, "cannot reach"),
    (errno.EAFNOSUPPORT, "socket: Address family not supported", ConfigError,
     "systemctl daemon-reload"),
    (errno.ENOTSUP, "server replied with error to opt_go request: Operation not supported",
     ConfigError, "requires TLS"),
    (errno.ENOENT, "server replied with error to opt_go request: No such file or directory "
     "for export: vol", ConfigError, "refused the export"),
])
def test_a_failed_handshake_names_the_server_and_the_way_out(number, message, kind, words):
    error = probe_error(config(), number, message)
    assert type(error) is kind
    assert URI in str(error) and words in str(error) and message in str(error)
