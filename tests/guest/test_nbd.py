"""The nbd backend against real NBD servers started in the guest (issue 11).

Servers listen on unix sockets under /run/ublkd-test-nbd; every command
that touches a device is bounded by `timeout`, so a device whose requests
hang fails the test instead of stalling the session.
"""

from __future__ import annotations

import re

import pytest

from tests.guest.serving import FioThroughExt4, kill_and_wait_live, show, start, write_config

RUN = "/run/ublkd-test-nbd"
IMAGES = "/var/tmp/ublkd-test-nbd"
MNT = "/mnt/vol0"


class QemuNbd:
    """qemu-nbd serving an image on a unix socket (-t: it outlives its clients;
    -e 0: any number of them, and multi-conn)."""

    def __init__(self, guest, image_format: str = "raw", size: str = "512M",
                 name: str = "img", port: int | None = None):
        self.guest = guest
        self.port = port
        self.image = f"{IMAGES}/{name}.{image_format}"
        self.socket = f"{RUN}/{name}.sock"
        self.format = image_format
        guest.run(f"mkdir -p {RUN} {IMAGES} && rm -f {self.image} {self.socket} && "
                  + (f"qemu-img create -q -f qcow2 {self.image} {size}" if image_format == "qcow2"
                     else f"truncate -s {size} {self.image}"))
        self.start()

    @property
    def uri(self) -> str:
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/"
        return f"nbd+unix:///?socket={self.socket}"

    def start(self, *options: str) -> None:
        cache = "--cache=writethrough" if self.format == "qcow2" else ""
        where = f"-b 127.0.0.1 -p {self.port}" if self.port else f"-k {self.socket}"
        self.guest.run(f"rm -f {self.socket}; setsid qemu-nbd -t -e 0 -f {self.format} {cache} "
                       f"{' '.join(options)} {where} --pid-file={RUN}/qemu-nbd.pid "
                       f"{self.image} </dev/null >{RUN}/qemu-nbd.log 2>&1 &")
        self.guest.run(f"for i in $(seq 100); do nbdinfo --size '{self.uri}' >/dev/null 2>&1 "
                       f"&& exit 0; sleep 0.1; done; cat {RUN}/qemu-nbd.log; exit 1")

    def stop(self) -> None:
        pattern = f"'[q]emu-nbd .*{self.image}'"
        self.guest.run(f"pkill -KILL -f {pattern}; "
                       f"while pgrep -f {pattern} >/dev/null; do sleep 0.1; done; true")


@pytest.fixture
def servers(systemd_guest):
    started: list[QemuNbd] = []

    def make(*args, **kwargs) -> QemuNbd:
        server = QemuNbd(systemd_guest, *args, **kwargs)
        started.append(server)
        return server

    yield make
    systemd_guest.run("systemctl stop 'ublkd@*'; true", timeout=300)
    for server in started:
        server.stop()
    systemd_guest.run(f"rm -rf {RUN} {IMAGES}")


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_an_export_serves_ext4_and_survives_kills_of_ublkd(systemd_guest, servers, journal,
                                                          image_format):
    guest = systemd_guest
    server = servers(image_format)
    status = start(guest, "vol0", f'backend = "nbd"\nuri = "{server.uri}"\nqueues = 2\n')
    assert status["backend"] == "nbd" and status["size"] == "512 MiB"
    dev = status["device"]
    application = FioThroughExt4(guest, dev, MNT)
    for who in ("main", "unit"):
        guest.run("sleep 2")
        kill_and_wait_live(guest, "vol0", who=who)
    application.finish()
    log = journal.of("ublkd@vol0")
    assert len(re.findall(rf"vol0: recovered {dev}", log)) == 2, log
    if image_format == "qcow2":
        guest.run(f"qemu-img check -q {server.image}", check=False)


def test_data_reaches_the_export(systemd_guest, servers):
    guest = systemd_guest
    server = servers("raw", size="64M")
    dev = start(guest, "vol0", f'backend = "nbd"\nuri = "{server.uri}"\n')["device"]
    guest.run(f"head -c 4M /dev/urandom > /tmp/nbd-pattern && timeout 60 dd "
              f"if=/tmp/nbd-pattern of={dev} bs=1M seek=8 oflag=direct,sync status=none")
    guest.run(f"timeout 60 cmp -n 4194304 /tmp/nbd-pattern {dev} 0 8388608")
    guest.run(f"cmp -n 4194304 /tmp/nbd-pattern {server.image} 0 8388608")


@pytest.mark.parametrize("uri, message", [
    ("nbd+unix:///nope?socket={socket}", "refused the export"),
])
def test_a_wrong_export_fails_the_unit_without_restarts(systemd_guest, servers, uri, message):
    guest = systemd_guest
    server = servers("raw", size="64M")
    write_config(guest, "bad", f'backend = "nbd"\nuri = "{uri.format(socket=server.socket)}"\n')
    assert guest.run("systemctl start ublkd@bad", check=False, timeout=180).rc != 0
    guest.run("sleep 2")
    unit = show(guest, "ublkd@bad", "NRestarts", "ActiveState", "ExecMainStatus")
    assert unit == {"NRestarts": "0", "ActiveState": "failed", "ExecMainStatus": "2"}
    assert message in guest.journal("-u", "ublkd@bad", "-n", "20")


def test_an_export_smaller_than_size_is_refused(systemd_guest, servers):
    guest = systemd_guest
    server = servers("raw", size="64M")
    write_config(guest, "small", f'backend = "nbd"\nuri = "{server.uri}"\nsize = "1GiB"\n')
    assert guest.run("systemctl start ublkd@small", check=False, timeout=180).rc != 0
    assert show(guest, "ublkd@small", "ExecMainStatus") == {"ExecMainStatus": "2"}
    assert "smaller than size = 1 GiB" in guest.journal("-u", "ublkd@small", "-n", "20")


def test_a_restarted_server_costs_applications_nothing(systemd_guest, servers, journal):
    """qemu-nbd killed under fio verify through ext4 and started again 3 s
    later: I/O waits, then goes on; fio, verify and e2fsck see nothing."""
    guest = systemd_guest
    server = servers("raw")
    dev = start(guest, "vol0", f'backend = "nbd"\nuri = "{server.uri}"\nqueues = 2\n')["device"]
    application = FioThroughExt4(guest, dev, MNT)
    guest.run("sleep 3")
    server.stop()
    guest.run("sleep 3")
    server.start()
    application.finish()
    assert show(guest, "ublkd@vol0", "NRestarts", "ActiveState") == {
        "NRestarts": "0", "ActiveState": "active"}


def test_past_reconnect_timeout_io_fails_and_the_daemon_stays(systemd_guest, servers):
    guest = systemd_guest
    server = servers("raw", size="64M")
    dev = start(guest, "vol0", f'backend = "nbd"\nuri = "{server.uri}"\n'
                               f'reconnect_timeout = 3\n')["device"]
    server.stop()
    failed = guest.run(f"timeout 60 dd if={dev} of=/dev/null bs=4k count=1 iflag=direct "
                       f"status=none", check=False)
    assert failed.rc == 1 and "Input/output error" in failed.stderr, failed.describe()
    assert show(guest, "ublkd@vol0", "ActiveState", "NRestarts") == {
        "ActiveState": "active", "NRestarts": "0"}
    server.start()
    guest.run(f"for i in $(seq 100); do timeout 10 dd if={dev} of=/dev/null bs=4k count=1 "
              f"iflag=direct status=none && exit 0; sleep 0.1; done; exit 1", timeout=120)


def test_an_export_over_tcp_is_reached_through_the_generators_drop_in(systemd_guest, servers):
    """The unit allows only unix sockets; ublkd-generator adds IP for nbd:// configs."""
    guest = systemd_guest
    server = servers("raw", size="64M", port=10811)
    write_config(guest, "tcp", f'backend = "nbd"\nuri = "{server.uri}"\n')
    guest.run("systemctl daemon-reload")
    assert "AF_INET" in guest.run("systemctl show -p RestrictAddressFamilies ublkd@tcp").stdout
    dev = start(guest, "tcp", f'backend = "nbd"\nuri = "{server.uri}"\n')["device"]
    guest.run(f"head -c 1M /dev/urandom > /tmp/nbd-tcp && timeout 60 dd if=/tmp/nbd-tcp "
              f"of={dev} bs=1M oflag=direct status=none && timeout 60 cmp -n 1048576 "
              f"/tmp/nbd-tcp {dev}")
