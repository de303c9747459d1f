"""The rbd backend against a one-node Ceph cluster in the guest (issue 12).

The cluster (tests/guest/ceph-cluster: one monitor, one OSD on memstore,
cephx) lives in /run/ublkd-test-ceph for the whole module; a test that
finds it dead (a power-cycled guest) starts it again.  Each test makes its
own image.  Commands that touch a device are bounded by `timeout`.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from tests.guest.conftest import CHECKOUT
from tests.guest.serving import (FioThroughExt4, device_status, hand_over_pause,
                                 kill_and_wait_live, kill_worker_and_time_first_read,
                                 serve_without_library, served_state, show,
                                 upgrade_under_fio, wait_in_guest, write_config)

CLUSTER = "/run/ublkd-test-ceph"
CONF = f"{CLUSTER}/ceph.conf"
CEPH = f"CEPH_CONF={CONF} timeout 120"
MNT = "/mnt/vol0"
IMAGES = itertools.count(1)


@pytest.fixture(scope="module", autouse=True)
def cluster_stopped_after_the_module(guest):
    """The cluster's daemons (and the OSD's memory) do not outlive the module:
    the tests after it measure the guest's CPU and memory."""
    yield
    guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster stop {CLUSTER}", check=False,
              timeout=300)


@pytest.fixture
def ceph(systemd_guest):
    """A running cluster, and a maker of new images in pool "rbd"."""
    guest = systemd_guest
    if guest.run(f"pgrep -f '^ceph-osd -c {CONF}' >/dev/null && echo up | {CEPH} rados -p rbd "
                 f"put ublkd-ready -", check=False).rc != 0:
        guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster start {CLUSTER}", timeout=300)
    made: list[str] = []

    def image(size: str = "256M") -> str:
        name = f"img{next(IMAGES)}"
        guest.run(f"{CEPH} rbd create rbd/{name} --size {size}")
        made.append(name)
        return name

    yield image
    guest.run("systemctl stop 'ublkd@*'; true", timeout=300)
    for name in made:
        guest.run(f"{CEPH} rbd rm --no-progress rbd/{name}", check=False)


def rbd_config(image: str, extra: str = "") -> str:
    return (f'backend = "rbd"\npool = "rbd"\nimage = "{image}"\nceph_conf = "{CONF}"\n'
            f"{extra}")


def start_rbd(guest, name: str, config: str, check: bool = True) -> dict | None:
    """Write the config, let ublkd-generator allow TCP for it, start the unit."""
    write_config(guest, name, config)
    guest.run("systemctl daemon-reload")
    result = guest.run(f"systemctl start ublkd@{name}", check=check, timeout=180)
    return served_state(guest, name) if result.rc == 0 else None


def test_an_image_serves_ext4_its_bytes_reach_the_cluster_and_it_is_mapped_once(
        systemd_guest, ceph):
    """ext4 on the device; `rbd export` reads back what the device holds; a
    second device on the same image is refused while the first serves (exit 2,
    no restarts), and serves the same file system once the first is gone."""
    guest = systemd_guest
    image = ceph("64M")
    dev = start_rbd(guest, "vol0", rbd_config(image))["device"]
    status = device_status(guest, "vol0")
    assert status["backend"] == "rbd" and status["size"] == "64 MiB", status
    assert status["image"] == f"rbd/{image}", status
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p {MNT} && mount {dev} {MNT} && "
              f"head -c 20M /dev/urandom > {MNT}/data && sync && umount {MNT}")
    guest.run(f"{CEPH} rbd export --no-progress rbd/{image} /tmp/exported && "
              f"timeout 60 cmp {dev} /tmp/exported; rc=$?; rm -f /tmp/exported; exit $rc")

    assert start_rbd(guest, "vol1", rbd_config(image), check=False) is None
    guest.run("sleep 2")
    assert show(guest, "ublkd@vol1", "NRestarts", "ActiveState", "ExecMainStatus") == {
        "NRestarts": "0", "ActiveState": "failed", "ExecMainStatus": "2"}
    assert f"image rbd/{image} is in use" in guest.journal("-u", "ublkd@vol1", "-n", "20")

    guest.run("systemctl stop ublkd@vol0", timeout=180)
    guest.run("systemctl reset-failed ublkd@vol1")
    dev = start_rbd(guest, "vol1", rbd_config(image))["device"]
    guest.run(f"timeout 120 e2fsck -fn {dev}")


def test_kills_of_ublkd_under_fio_cost_applications_nothing(systemd_guest, ceph, journal,
                                                             report):
    """kill -9 of the worker (twice) and of the whole unit, under fio verify
    through ext4: each recovery breaks the dead session's lock at once
    instead of waiting ~30 s for its watch to expire."""
    guest = systemd_guest
    image = ceph()
    dev = start_rbd(guest, "vol0", rbd_config(image, "queues = 2\n"))["device"]
    application = FioThroughExt4(guest, dev, MNT)
    gaps = []
    for _ in range(2):
        guest.run("sleep 2")
        gaps.append(kill_worker_and_time_first_read(guest, "vol0", dev))
    guest.run("sleep 2")
    kill_and_wait_live(guest, "vol0", who="unit")
    application.finish()
    log = journal.of("ublkd@vol0")
    assert len(re.findall(rf"vol0: recovered {dev}", log)) == 3, log
    assert len(re.findall(r"breaking the exclusive lock of \S+ on rbd/", log)) >= 3, log
    report(f"rbd: first read after kill -9 of the worker: "
           f"{', '.join(f'{gap:.2f}' for gap in gaps)} s")


def test_a_cephx_user_of_its_own_serves_an_image_in_a_namespace_across_a_kill(
        systemd_guest, ceph, journal):
    """What a cluster's admin hands out: client.ublkd with `profile rbd` on one
    namespace only, and its own keyring file.  The bytes written survive a
    kill -9 of the worker, whose recovery breaks the dead session's lock
    (the profile's blocklist right) instead of waiting for its watch."""
    guest = systemd_guest
    spec = "rbd/ns1/vol"
    guest.run(f"{CEPH} rbd namespace create rbd/ns1 && {CEPH} rbd create {spec} --size 64M && "
              f"{CEPH} ceph auth get-or-create client.ublkd mon 'profile rbd' "
              f"osd 'profile rbd pool=rbd namespace=ns1' -o /tmp/ublkd.keyring")
    try:
        config = rbd_config("vol", 'namespace = "ns1"\nclient = "ublkd"\n'
                                   'keyring = "/tmp/ublkd.keyring"\n')
        dev = start_rbd(guest, "vol0", config)["device"]
        assert device_status(guest, "vol0")["image"] == spec
        guest.run(f"head -c 4M /dev/urandom > /tmp/ns-data && timeout 60 dd if=/tmp/ns-data "
                  f"of={dev} bs=1M oflag=direct status=none")
        kill_worker_and_time_first_read(guest, "vol0", dev)
        guest.run(f"timeout 60 cmp -n 4194304 {dev} /tmp/ns-data")
        assert re.search(rf"breaking the exclusive lock of \S+ on {spec}", journal.of("ublkd@vol0"))
        guest.run("systemctl stop ublkd@vol0", timeout=180)
    finally:
        guest.run(f"systemctl stop ublkd@vol0; {CEPH} rbd rm --no-progress {spec}; "
                  f"{CEPH} rbd namespace remove rbd/ns1; {CEPH} ceph auth del client.ublkd; "
                  f"rm -f /tmp/ublkd.keyring /tmp/ns-data", check=False, timeout=300)


def test_an_osd_and_a_monitor_restart_under_fio_cost_applications_nothing(systemd_guest, ceph,
                                                                        journal):
    """The OSD, then the monitor, stopped for 10 s each under fio through ext4:
    librbd holds and retries, nobody sees an error, nothing restarts; and a
    kill -9 after the monitor's restart still recovers at once (the lock
    break asks the monitor for a blocklist entry)."""
    guest = systemd_guest
    image = ceph()
    dev = start_rbd(guest, "vol0", rbd_config(image))["device"]
    application = FioThroughExt4(guest, dev, MNT)
    for daemon in ("osd", "mon"):
        guest.run("sleep 2")
        guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster {daemon}-stop {CLUSTER}", timeout=120)
        guest.run("sleep 10")
        guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster {daemon}-start {CLUSTER}",
                  timeout=120)
    assert show(guest, "ublkd@vol0", "NRestarts", "ActiveState") == {
        "NRestarts": "0", "ActiveState": "active"}
    guest.run("sleep 2")
    kill_worker_and_time_first_read(guest, "vol0", dev)
    application.finish()
    assert re.search(rf"breaking the exclusive lock of \S+ on rbd/{image}",
                     journal.of("ublkd@vol0"))


WRONG_CONFIGS = {  # device: (config keys changed, exit status, what the journal says)
    "nopool": ({"pool": "nopool"}, "2", "pool 'nopool' does not exist"),
    "noimage": ({"image": "noimage"}, "2", "image rbd/noimage does not exist"),
    "noclient": ({"client": "nobody"}, "2", "the cluster refused client.nobody"),
    "badkey": ({"keyring": "/tmp/wrong.keyring"}, "2", "the cluster refused client.admin"),
    "noconf": ({"ceph_conf": "/nonexistent/ceph.conf"}, "2",
               "cannot read the Ceph configuration"),
    "toosmall": ({"size": "1GiB"}, "2", "smaller than size = 1 GiB"),
    # Monitors that do not answer: exit 6, which systemd retries (the
    # cluster may be on its way up).
    "down": ({"ceph_conf": "/tmp/down.conf"}, "6", "did not answer"),
}


def test_wrong_configs_and_an_unreachable_cluster_fail_with_what_to_fix(systemd_guest, ceph):
    """Every case at once (their units start side by side): a mistake in the
    config exits 2 with no restart; an unreachable cluster exits 6 and is
    retried."""
    guest = systemd_guest
    image = ceph("64M")
    guest.run(f"sed 's/^mon_host = .*/mon_host = 127.0.0.1:1/' {CONF} > /tmp/down.conf && "
              f"ceph-authtool --create-keyring /tmp/wrong.keyring --gen-key -n client.admin "
              f">/dev/null")
    for name, (change, _, _) in WRONG_CONFIGS.items():
        keys = {"pool": "rbd", "image": image, "ceph_conf": CONF, **change}
        write_config(guest, name, 'backend = "rbd"\n' + "".join(
            f'{key} = "{value}"\n' for key, value in keys.items()))
    guest.run("systemctl daemon-reload")
    units = " ".join(f"ublkd@{name}" for name in WRONG_CONFIGS)
    guest.run(f"systemctl start {units}", check=False, timeout=180)
    for name, (_, status, message) in WRONG_CONFIGS.items():
        log = guest.journal("-u", f"ublkd@{name}", "-n", "40")
        assert message in log and f"status={status}/" in log, log
        restarts = show(guest, f"ublkd@{name}", "NRestarts")["NRestarts"]
        assert (restarts == "0") == (status == "2"), (name, restarts)
    # "down" is connecting again (20 s); a stop would wait for that.
    guest.run("systemctl stop --no-block ublkd@down; systemctl kill -s KILL ublkd@down || true")
    guest.run(f"systemctl stop {units}; systemctl reset-failed {units}; "
              f"rm /tmp/down.conf /tmp/wrong.keyring")


def test_upgrade_hands_the_image_and_its_lock_over(systemd_guest, ceph, journal, report):
    """`ublkd upgrade` under fio's verified writes: the successor opens the
    image, waits for the old worker to let go of the lock (never breaks a
    live one), and serves the same /dev/ublkbN with no failed write."""
    guest = systemd_guest
    image = ceph()
    status = start_rbd(guest, "vol0", rbd_config(image))
    job = upgrade_under_fio(guest, "vol0", status, runtime=20)
    assert show(guest, "ublkd@vol0", "ActiveState")["ActiveState"] == "active"
    assert "breaking the exclusive lock" not in journal.of("ublkd@vol0")
    # The old worker closed the image: its watch did not stay to expire.
    watchers = json.loads(guest.run(f"{CEPH} rbd status --format json rbd/{image}").stdout)
    assert len(watchers["watchers"]) == 1, watchers
    report(f"rbd hand-over: {hand_over_pause(job)}")


def test_a_snapshot_is_served_read_only(systemd_guest, ceph):
    guest = systemd_guest
    image = ceph("64M")
    guest.run(f"head -c 1M /dev/urandom > /tmp/snap-data && {CEPH} rbd import --no-progress "
              f"/tmp/snap-data rbd/{image}-src && {CEPH} rbd resize --no-progress --size 64M "
              f"rbd/{image}-src && {CEPH} rbd snap create "
              f"rbd/{image}-src@s1 && {CEPH} rbd snap protect rbd/{image}-src@s1")
    try:
        config = (f'backend = "rbd"\npool = "rbd"\nimage = "{image}-src"\nsnapshot = "s1"\n'
                  f'read_only = true\nceph_conf = "{CONF}"\n')
        dev = start_rbd(guest, "snap", config)["device"]
        guest.run(f"timeout 60 cmp -n 1048576 {dev} /tmp/snap-data")
        assert guest.run(f"blockdev --getro {dev}").stdout.strip() == "1"
        write = guest.run(f"timeout 60 dd if=/dev/zero of={dev} bs=4k count=1 oflag=direct",
                          check=False)
        assert write.rc != 0, write.describe()
        guest.run("systemctl stop ublkd@snap", timeout=180)
    finally:
        guest.run(f"{CEPH} rbd snap unprotect rbd/{image}-src@s1; {CEPH} rbd snap purge "
                  f"rbd/{image}-src; {CEPH} rbd rm --no-progress rbd/{image}-src; "
                  f"rm -f /tmp/snap-data", check=False)


def test_a_read_only_device_serves_beside_a_writer_with_a_read_only_cephx_user(
        systemd_guest, ceph, journal):
    """`read_only = true` opens the image read-only (`rbd device map
    --read-only`): no lock, so the image's writer keeps it, and a user with
    `profile rbd-read-only` suffices; what the writer wrote is read back."""
    guest = systemd_guest
    image = ceph("64M")
    guest.run(f"{CEPH} ceph auth get-or-create client.reader mon 'profile rbd' "
              f"osd 'profile rbd-read-only pool=rbd' -o /tmp/reader.keyring")
    try:
        writer = start_rbd(guest, "vol0", rbd_config(image))["device"]
        guest.run(f"head -c 1M /dev/urandom > /tmp/ro-data && timeout 60 dd if=/tmp/ro-data "
                  f"of={writer} bs=1M oflag=direct status=none")
        reader = start_rbd(guest, "ro", rbd_config(image, 'read_only = true\nclient = "reader"\n'
                                                          'keyring = "/tmp/reader.keyring"\n'))
        guest.run(f"timeout 60 cmp -n 1048576 {reader['device']} /tmp/ro-data")
        guest.run(f"timeout 60 dd if=/dev/urandom of={writer} bs=4k count=16 oflag=direct")
        assert show(guest, "ublkd@vol0", "NRestarts", "ActiveState") == {
            "NRestarts": "0", "ActiveState": "active"}
        assert "breaking the exclusive lock" not in journal.of("ublkd@vol0")
    finally:
        guest.run(f"systemctl stop ublkd@ro; {CEPH} ceph auth del client.reader; "
                  f"rm -f /tmp/reader.keyring /tmp/ro-data", check=False, timeout=300)


def test_past_io_timeout_io_fails_and_the_daemon_stays(systemd_guest, ceph):
    """The OSD gone for longer than io_timeout (30 s, past the unit's 20 s
    watchdog): a read waits, then fails with EIO; the daemon, only waiting
    for the cluster, is neither killed nor restarted, and serves again once
    the OSD is back."""
    guest = systemd_guest
    dev = start_rbd(guest, "vol0", rbd_config(ceph("64M"), "io_timeout = 30\n"))["device"]
    # Written first: librbd answers a read of an object never written
    # without asking the OSD.
    guest.run(f"timeout 60 dd if=/dev/urandom of={dev} bs=4k count=1 oflag=direct")
    guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster osd-stop {CLUSTER}", timeout=120)
    try:
        guest.run(f"(timeout 120 dd if={dev} of=/dev/null bs=4k count=1 iflag=direct; "
                  f"echo rc=$?) >/tmp/held-read 2>&1 &")
        wait_in_guest(guest, "systemctl show -p StatusText --value ublkd@vol0 | "
                             "grep -q degraded", timeout=60)
        status = show(guest, "ublkd@vol0", "StatusText")["StatusText"]
        assert re.search(r"the Ceph cluster has not answered I/O for over \d+ s \(librbd "
                         r"retries; EIO after io_timeout = 30 s\)", status), status
        wait_in_guest(guest, "grep -q rc= /tmp/held-read", timeout=120)
        read = guest.run("cat /tmp/held-read").stdout
        assert "rc=1" in read and "Input/output error" in read, read
        assert show(guest, "ublkd@vol0", "NRestarts", "ActiveState") == {
            "NRestarts": "0", "ActiveState": "active"}
    finally:
        guest.run(f"sh {CHECKOUT}/tests/guest/ceph-cluster osd-start {CLUSTER}", timeout=120)
    guest.run(f"timeout 120 dd if={dev} of=/dev/null bs=4k count=1 iflag=direct")


def test_without_librbd_an_rbd_device_names_the_package_to_install(systemd_guest):
    """librbd hidden in a private mount namespace (the file backend needs none)."""
    guest = systemd_guest
    write_config(guest, "nolib", rbd_config("img"))
    result = serve_without_library(guest, "nolib", "librbd.so.1")
    assert result.rc == 8, result.describe()
    assert "needs librbd" in result.stderr and "apt-get install librbd1" in result.stderr, \
        result.describe()
