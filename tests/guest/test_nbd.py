"""The nbd backend against real NBD servers started in the guest (issue 11).

Servers listen on unix sockets under /run/ublkd-test-nbd; every command
that touches a device is bounded by `timeout`, so a device whose requests
hang fails the test instead of stalling the session.
"""

from __future__ import annotations

import re

import pytest

from tests.guest.serving import (FioThroughExt4, device_status, kill_and_wait_live,
                                 serve_without_library, served_state, show, start, ublkd,
                                 upgrade_under_fio, write_config)

RUN = "/run/ublkd-test-nbd"
IMAGES = "/var/tmp/ublkd-test-nbd"
MNT = "/mnt/vol0"


class QemuNbd:
    """qemu-nbd serving an image on a unix socket (-t: it outlives its clients;
    -e 0: any number of them, and multi-conn)."""

    def __init__(self, guest, image_format: str = "raw", size: str = "512M",
                 name: str = "img", port: int | None = None, options: tuple[str, ...] = ()):
        self.guest = guest
        self.port = port
        self.image = f"{IMAGES}/{name}.{image_format}"
        self.socket = f"{RUN}/{name}.sock"
        self.format = image_format
        guest.run(f"mkdir -p {RUN} {IMAGES} && rm -f {self.image} {self.socket} && "
                  + (f"qemu-img create -q -f qcow2 {self.image} {size}" if image_format == "qcow2"
                     else f"truncate -s {size} {self.image}"))
        self.start(*options)

    @property
    def uri(self) -> str:
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/"
        return f"nbd+unix:///?socket={self.socket}"

    def start(self, *options: str) -> None:
        cache = "--cache=writethrough" if self.format == "qcow2" else ""
        where = f"-b 127.0.0.1 -p {self.port}" if self.port else f"-k {self.socket}"
        self.guest.run(f"rm -f {self.socket}")
        serve_in_background(self.guest, f"qemu-nbd -t -e 0 -f {self.format} {cache} "
                                         f"{' '.join(options)} {where} {self.image}", self.uri)

    def stop(self) -> None:
        pattern = f"'[q]emu-nbd .*{self.image}'"
        self.guest.run(f"pkill -KILL -f {pattern}; "
                       f"while pgrep -f {pattern} >/dev/null; do sleep 0.1; done; true")


def serve_in_background(guest, command: str, uri: str) -> None:
    """Start an NBD server that stays after the guest command returns; return
    once `uri` answers, else fail with the server's output."""
    log = f"{RUN}/{command.split()[0]}.log"
    guest.run(f"mkdir -p {RUN} && setsid {command} </dev/null >{log} 2>&1 &")
    guest.run(f"for i in $(seq 100); do nbdinfo --size '{uri}' >/dev/null 2>&1 "
              f"&& exit 0; sleep 0.1; done; cat {log}; exit 1")


def nbdkit_memory(guest, size: str = "256M", *options: str) -> str:
    """`nbdkit memory` on a unix socket (its data lives as long as it does)."""
    socket = f"{RUN}/memory.sock"
    uri = f"nbd+unix:///?socket={socket}"
    serve_in_background(guest, f"nbdkit -f {' '.join(options)} -U {socket} memory {size}", uri)
    return uri


def nbd_server(guest, size: str = "256M") -> str:
    """nbd-server on 127.0.0.1 exporting a file, with flush, FUA and trim
    (only its config file offers them); its URI is nbd:// (TCP)."""
    guest.run(f"mkdir -p {RUN} {IMAGES} && truncate -s {size} {IMAGES}/nbd-server.img")
    guest.write_file(f"{RUN}/nbd-server.conf",
                     f"[generic]\nlistenaddr = 127.0.0.1\nport = 10810\n"
                     f"[vol]\nexportname = {IMAGES}/nbd-server.img\n"
                     f"flush = true\nfua = true\ntrim = true\n")
    uri = "nbd://127.0.0.1:10810/vol"
    serve_in_background(guest, f"nbd-server -C {RUN}/nbd-server.conf -p {RUN}/nbd-server.pid",
                        uri)
    return uri


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
    systemd_guest.run(f"pkill -KILL -x nbdkit; pkill -KILL -x nbd-server; rm -rf {RUN} {IMAGES}")


def test_upgrade_hands_over_with_a_server_that_takes_one_client(systemd_guest, servers):
    """`ublkd upgrade` under fio's verified writes, on qemu-nbd -e 1 (one client
    at a time: a second connection gets no answer until the first closes).
    The successor connects only once the old worker has let go, so the
    hand-over neither waits on the server nor fails a write; the same
    /dev/ublkbN serves on."""
    guest = systemd_guest
    server = servers("raw", options=("-e", "1"))
    status = start(guest, "vol0", f'backend = "nbd"\nuri = "{server.uri}"\n')
    upgrade_under_fio(guest, "vol0", status)
    assert show(guest, "ublkd@vol0", "ActiveState")["ActiveState"] == "active"


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_an_export_serves_ext4_and_survives_kills_of_ublkd(systemd_guest, servers, journal,
                                                          image_format):
    guest = systemd_guest
    server = servers(image_format)
    start(guest, "vol0", f'backend = "nbd"\nuri = "{server.uri}"\nqueues = 2\n')
    status = device_status(guest, "vol0")
    assert status["backend"] == "nbd" and status["size"] == "512 MiB", status
    dev = status["device"]
    application = FioThroughExt4(guest, dev, MNT)
    # The whole unit (systemd restarts it) on both; `ublkd serve` alone on raw.
    kills = ("main", "unit") if image_format == "raw" else ("unit",)
    for who in kills:
        guest.run("sleep 1")  # fio at work again, its requests in flight
        kill_and_wait_live(guest, "vol0", who=who)
    application.finish()
    log = journal.of("ublkd@vol0")
    assert len(re.findall(rf"vol0: recovered {dev}", log)) == len(kills), log
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


def unit_cgroup(guest, unit: str) -> str:
    return "/sys/fs/cgroup" + show(guest, unit, "ControlGroup")["ControlGroup"]


def sleeps_per_request(guest, unit: str, dev: str) -> float:
    """Voluntary context switches of the unit's threads (what `pidstat -w`
    counts: a thread that went to sleep) per request of a verified 4k write
    job at iodepth 1."""
    cgroup = unit_cgroup(guest, unit)
    count = (f"for p in $(cat {cgroup}/cgroup.procs); do cat /proc/$p/task/*/status; done "
             f"2>/dev/null | awk '/^voluntary_ctxt_switches/ {{s += $2}} END {{print s}}'")
    before = int(guest.run(count).stdout)
    guest.run(f"timeout 300 fio --name=qd1 --filename={dev} --rw=randwrite --bs=4k --size=8M "
              f"--ioengine=psync --direct=1 --verify=crc32c --verify_fatal=1", timeout=330)
    requests = 2 * 8 * 256  # each block written, then read back
    return (int(guest.run(count).stdout) - before) / requests


def cpu_seconds(guest, unit: str) -> float:
    cpu_stat = f"{unit_cgroup(guest, unit)}/cpu.stat"
    return int(guest.run(f"awk '/^usage_usec/ {{print $2}}' {cpu_stat}").stdout) / 1e6


def test_poll_us_keeps_queues_awake_while_io_flows_and_asleep_when_idle(systemd_guest,
                                                                       servers, journal,
                                                                       report):
    """Without poll_us the queue thread sleeps for each request; with it
    (taken by `ublkd upgrade`, the device kept) it does not, and it stops
    polling once the I/O stops: an idle device costs no CPU."""
    guest = systemd_guest
    config = f'backend = "nbd"\nuri = "{nbdkit_memory(guest, "64M")}"\n'
    status = start(guest, "polled", config)
    asleep = sleeps_per_request(guest, "ublkd@polled", status["device"])
    assert asleep >= 0.5, f"{asleep:.2f} sleeps per request without polling"

    write_config(guest, "polled", config + "poll_us = 20000\n")
    ublkd(guest, "upgrade", "polled", timeout=180)
    assert "queues poll for 20000 us" in journal.of("ublkd@polled")
    awake = sleeps_per_request(guest, "ublkd@polled", status["device"])
    assert awake < 0.1, f"{awake:.2f} sleeps per request with poll_us = 20000"
    report(f"nbd poll_us: {asleep:.2f} sleeps per request without, {awake:.3f} with 20000")

    idle_start = cpu_seconds(guest, "ublkd@polled")
    guest.run("sleep 5")
    idle = cpu_seconds(guest, "ublkd@polled") - idle_start
    assert idle < 1.0, f"the daemon used {idle:.1f} s of CPU in 5 s with no I/O"
    assert served_state(guest, "polled")["device"] == status["device"]


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


@pytest.mark.parametrize("server", ["nbdkit memory", "nbd-server"])
def test_each_server_keeps_a_file_system_across_a_remount(systemd_guest, servers, server):
    """fio writes and verifies files through ext4; after a remount fio reads
    them back (verify_only): what was written went to the server and back."""
    guest = systemd_guest
    uri = nbdkit_memory(guest) if server == "nbdkit memory" else nbd_server(guest)
    write_config(guest, "vol0", f'backend = "nbd"\nuri = "{uri}"\n')
    guest.run("systemctl daemon-reload")  # nbd:// needs ublkd-generator's drop-in
    dev = start(guest, "vol0", f'backend = "nbd"\nuri = "{uri}"\n')["device"]
    job = (f"fio --name=remount --directory={MNT} --rw=randwrite --bs=4k --size=8M "
           f"--numjobs=2 --ioengine=psync --fsync=64 --verify=crc32c --verify_fatal=1 "
           f"--randseed=11")
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p {MNT} && mount {dev} {MNT} && "
              f"timeout 600 {job} && umount {MNT}", timeout=900)
    guest.run(f"mount {dev} {MNT} && timeout 600 {job} --verify_only && umount {MNT} && "
              f"e2fsck -fn {dev}", timeout=900)


def test_a_read_only_export_needs_read_only_and_is_served_read_only(systemd_guest, servers):
    guest = systemd_guest
    server = servers("raw", size="64M", options=("-r",))
    write_config(guest, "ro", f'backend = "nbd"\nuri = "{server.uri}"\n')
    assert guest.run("systemctl start ublkd@ro", check=False, timeout=180).rc != 0
    assert show(guest, "ublkd@ro", "ExecMainStatus", "NRestarts") == {
        "ExecMainStatus": "2", "NRestarts": "0"}
    assert "is read-only; set read_only = true" in guest.journal("-u", "ublkd@ro", "-n", "20")
    guest.run("systemctl reset-failed ublkd@ro")
    dev = start(guest, "ro", f'backend = "nbd"\nuri = "{server.uri}"\nread_only = true\n'
                )["device"]
    assert guest.run(f"blockdev --getro {dev}").stdout.strip() == "1"
    guest.run(f"timeout 60 dd if={dev} of=/dev/null bs=1M count=4 iflag=direct status=none")
    write = guest.run(f"timeout 60 dd if=/dev/zero of={dev} bs=4k count=1 oflag=direct "
                      f"status=none", check=False)
    assert write.rc != 0 and "Operation not permitted" in write.stderr, write.describe()


def test_a_server_that_requires_tls_is_a_configuration_error(systemd_guest, servers):
    guest = systemd_guest
    guest.run(f"mkdir -p {RUN} && echo 'ublkd:0123456789abcdef0123456789abcdef' "
              f"> {RUN}/psk && chmod 600 {RUN}/psk")
    uri = f"nbd+unix:///?socket={RUN}/memory.sock"
    guest.run(f"setsid nbdkit -f --tls=require --tls-psk={RUN}/psk -U {RUN}/memory.sock "
              f"memory 64M </dev/null >{RUN}/nbdkit.log 2>&1 &")
    guest.run(f"for i in $(seq 100); do test -S {RUN}/memory.sock && exit 0; sleep 0.1; done; "
              f"cat {RUN}/nbdkit.log; exit 1")
    write_config(guest, "tls", f'backend = "nbd"\nuri = "{uri}"\n')
    assert guest.run("systemctl start ublkd@tls", check=False, timeout=180).rc != 0
    guest.run("sleep 2")
    assert show(guest, "ublkd@tls", "ExecMainStatus", "NRestarts") == {
        "ExecMainStatus": "2", "NRestarts": "0"}
    assert "requires TLS" in guest.journal("-u", "ublkd@tls", "-n", "20")


def test_without_libnbd_an_nbd_device_names_the_package_to_install(systemd_guest):
    """libnbd hidden in a private mount namespace (the file backend needs none)."""
    guest = systemd_guest
    write_config(guest, "nolib", 'backend = "nbd"\nuri = "nbd+unix:///?socket=/run/none.sock"\n')
    result = serve_without_library(guest, "nolib", "libnbd.so.0")
    assert result.rc == 8, result.describe()
    assert "needs libnbd" in result.stderr and "apt-get install libnbd0" in result.stderr, \
        result.describe()
