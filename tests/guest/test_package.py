"""The Debian package: built here, installed in a fresh guest, used as an
administrator would, upgraded under load, removed and purged.

The packages are built on the host first (packaging/build-deb, cached by
content): the checkout's version, and the same sources as the next patch
version for the upgrade.  What can be read from the .deb is checked on the
host.  The guest is one of this module's own, not the session guest, whose
/etc/systemd/system holds the checkout's units (`make install-units`), which
would shadow the package's.  It installs with dpkg: it has no network, the
dependencies are installed on the host (whose root the guest shares), and
apt-get would spend minutes under TCG reading the archive's package lists
(that apt resolves the package offline is checked on the host instead).
Every check in the guest runs the installed package: /usr/bin/ublkd,
/lib/systemd/system, /usr/lib/python3/dist-packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.guest.serving import CHECKOUT, STATE_DIR, JournalSince, devnum, \
    kill_and_wait_live, run_in_background, show
from tests.testbed import Guest, GuestConfig, KernelBuild

UBLKD = "/usr/bin/ublkd"
PYTHON_DIR = "/usr/lib/python3/dist-packages/ublkd"
UNIT_DIR = "/lib/systemd/system"
UNITS = ("ublkd@.service", "ublkd-giveup@.service", "ublkd-recover@.service",
         "ublkd-dbus.service")
BUS_FILES = ("usr/share/dbus-1/system-services/org.ublkd1.service",
             "usr/share/dbus-1/system.d/org.ublkd1.conf",
             "usr/share/polkit-1/actions/org.ublkd1.policy")
BACKING = "/var/tmp/vol0.img"
MNT = "/mnt/vol0"
# The upgrade test's devices: one handed over (a '-' in its name: the
# instance string, which postinst must not unescape into "vol/0"), and one
# created with recovery = "none", which must stay with its daemon.
HANDED_OVER, STAYS = "vol-0", "nr"


def code_version() -> str:
    text = (CHECKOUT / "ublkd" / "__init__.py").read_text()
    return re.search(r'^__version__ = "(.+)"$', text, re.M).group(1)


def next_version(version: str) -> str:
    """0.1.0 -> 0.1.1: the version the upgrade test installs over this one."""
    parts = version.split("+")[0].split(".")
    return ".".join([*parts[:-1], str(int(parts[-1]) + 1)])


def build_deb(outdir: Path, version: str | None = None, lintian: bool = False) -> Path:
    """packaging/build-deb; returns the .deb (no rebuild when nothing changed)."""
    env = dict(os.environ, OUTDIR=str(outdir), LINTIAN="1" if lintian else "0")
    if version:
        env["VERSION"] = version
    result = subprocess.run([str(CHECKOUT / "packaging" / "build-deb")], env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"packaging/build-deb failed (exit {result.returncode}):\n"
                    f"{result.stderr[-6000:]}", pytrace=False)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def debs() -> dict[str, Path]:
    """{"base": this checkout's package, "next": the same as the next version}."""
    build = CHECKOUT / "build"
    return {"base": build_deb(build / "deb"),
            "next": build_deb(build / "deb-next", next_version(code_version()))}


@pytest.fixture(scope="module")
def guest(kernel: KernelBuild, guest_logs: Path, debs):
    """This module's guest; named `guest` so that a failing test's report
    names its logs (conftest's hook looks the fixture up by that name)."""
    machine = Guest(kernel, guest_logs / "package", GuestConfig())
    machine.boot()
    # man-db's dpkg trigger re-indexes the manual pages, over 9p under TCG
    # (minutes); it runs only when this flag file exists.
    machine.run("rm -f /var/lib/man-db/auto-update")
    yield machine
    machine.shutdown()


def package_status(guest: Guest) -> tuple[str, str]:
    """(dpkg status, version) of ublkd; ("", "") if dpkg does not know it."""
    out = guest.run("dpkg-query -W -f '${db:Status-Status} ${Version}' ublkd 2>/dev/null",
                    check=False).stdout.split()
    return (out[0], out[1] if len(out) > 1 else "") if out else ("", "")


def dpkg_install(guest: Guest, deb: Path) -> str:
    return guest.run(f"dpkg -i {deb} 2>&1", timeout=600).stdout


@pytest.fixture
def package(guest, debs):
    """ublkd installed: the checkout's version unless a version is installed
    already (each dpkg run costs a minute or more under TCG, mostly reading
    dpkg's database of the host's packages: the tests run in an order that
    needs no reinstall).  Afterwards no device, mount, config or image is left."""
    if package_status(guest)[0] != "installed":
        dpkg_install(guest, debs["base"])
    yield guest
    mounts = " ".join(mount_point(name) for name in ("vol0", HANDED_OVER, STAYS))
    guest.run(f"umount -q {mounts} 2>/dev/null; systemctl stop 'ublkd@*'; "
              f"systemctl reset-failed 'ublkd@*'; true", timeout=300)
    leftover = guest.run("ls /sys/class/ublk-char/ 2>/dev/null; true").stdout.strip()
    guest.run("rm -f /var/tmp/*.img /etc/ublkd/*.toml")
    assert leftover == "", f"devices left behind: {leftover}"


def start_vol0(guest: Guest, name: str = "vol0", extra: str = "") -> dict:
    """Start device `name` (vol0 unless told) on /var/tmp/NAME.img; its status."""
    guest.write_file(f"/etc/ublkd/{name}.toml", f'backend = "file"\npath = '
                     f'"/var/tmp/{name}.img"\nsize = "256MiB"\n{extra}')
    guest.run(f"systemctl start ublkd@{name}", timeout=180)
    return status(guest, name)


def status(guest: Guest, name: str = "vol0") -> dict:
    return json.loads(guest.run([UBLKD, "status", name, "--json"]).stdout)


def mount_point(name: str) -> str:
    return f"/mnt/{name}"


def mount_with_data(guest: Guest, dev: str, name: str = "vol0") -> None:
    mnt = mount_point(name)
    guest.run(f"mkfs.ext4 -q {dev} && mkdir -p {mnt} && mount {dev} {mnt} && "
              f"head -c 8M /dev/urandom > /tmp/data-{name} && cp /tmp/data-{name} {mnt}/data "
              f"&& sync")


def data_intact(guest: Guest, name: str = "vol0") -> None:
    guest.run(f"echo 3 > /proc/sys/vm/drop_caches; cmp /tmp/data-{name} "
              f"{mount_point(name)}/data")


# -- on the host -------------------------------------------------------------------
def roff_tags(page: Path, section: str) -> set[str]:
    """First words of the outermost .TP tags in one section of a manual page."""
    lines = page.read_text().splitlines()
    start = lines.index(f".SH {section}")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(".SH "))
    tags, depth = set(), 0
    for i in range(start, end):
        depth += lines[i].startswith(".RS") - lines[i].startswith(".RE")
        if lines[i].startswith(".TP") and depth == 0:
            tag = re.sub(r"^\.[A-Z]+\s+|\\f[BIRP]|\"", "", lines[i + 1]).replace("\\-", "-")
            tags.add(tag.split()[0])
    return tags


def test_man_pages_document_every_command_and_key():
    from ublkd.cli import build_parser
    from ublkd.config import KNOWN_KEYS

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    man = CHECKOUT / "packaging" / "man"
    assert roff_tags(man / "ublkd.8", "COMMANDS") == set(commands)
    assert roff_tags(man / "ublkd.toml.5", "KEYS") == set(KNOWN_KEYS)


def test_man_pages_agree_with_the_unit():
    unit = (CHECKOUT / "units" / "ublkd@.service").read_text()
    setting = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    burst, interval = int(setting["StartLimitBurst"]), int(setting["StartLimitIntervalSec"])
    window = f"{interval // 60} minutes" if interval % 60 == 0 and interval >= 120 else \
        f"{interval} seconds"
    for page in ("ublkd.8", "ublkd.toml.5"):
        text = " ".join((CHECKOUT / "packaging" / "man" / page).read_text().split())
        assert f"{burst} starts within {window}" in text, page
    text = (CHECKOUT / "packaging" / "man" / "ublkd.8").read_text()
    assert f"WatchdogSec={setting['WatchdogSec']}" in text


def test_lintian_reports_no_errors_or_warnings(debs):
    build_deb(CHECKOUT / "build" / "deb", lintian=True)  # fails with lintian's report


def test_deb_contents_dependencies_and_offline_install(debs, tmp_path):
    deb = debs["base"]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    for path in ("usr/bin/ublkd", *(f"lib/systemd/system/{unit}" for unit in UNITS),
                 "usr/share/man/man8/ublkd.8.gz", "usr/share/man/man5/ublkd.toml.5.gz",
                 "usr/share/doc/ublkd/README.md", "usr/share/doc/ublkd/copyright",
                 "etc/needrestart/conf.d/ublkd.conf", *BUS_FILES):
        assert (tmp_path / path).is_file(), path
    assert (tmp_path / "etc/ublkd").is_dir()
    assert list(tmp_path.glob("usr/lib/python3/dist-packages/ublkd/kernel/_uring*.so"))
    for unit in UNITS:  # the units as they are in the checkout
        assert (tmp_path / "lib/systemd/system" / unit).read_text() == \
            (CHECKOUT / "units" / unit).read_text()
    for path in BUS_FILES:
        assert (tmp_path / path).read_text() == \
            (CHECKOUT / "units" / path.removeprefix("usr/share/")).read_text()
    # The example is where ublkd's "no config file" error says, and valid.
    from ublkd.config import EXAMPLE_CONFIG, parse_config
    example = tmp_path / EXAMPLE_CONFIG.lstrip("/")
    assert example.read_text() == (CHECKOUT / "conf/vol0.toml.example").read_text()
    assert parse_config("vol0", example.read_text(), example).backend == "file"
    assert tomllib.loads(example.read_text())  # plain TOML too

    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Architecture"],
                            check=True, capture_output=True, text=True).stdout
    depends = {re.split(r"[ (:]", d.strip())[0] for d in fields.split("\n")[0]
               .removeprefix("Depends:").split(",")}
    assert {"python3-cffi-backend", "python3-sdnotify", "python3-pystemd", "python3-pydbus",
            "liburing2", "python3"} <= depends, depends
    assert "python3-cffi" not in depends, depends  # the build needs it, nothing run imports it
    # libnbd and librbd are loaded only for nbd and rbd devices: file devices
    # pull nothing NBD and no Ceph.
    assert not any(part in name for name in depends for part in ("nbd", "rbd", "rados",
                                                                 "ceph")), depends
    suggests = subprocess.run(["dpkg-deb", "-f", str(deb), "Suggests"], check=True,
                              capture_output=True, text=True).stdout
    assert "libnbd0" in suggests and "librbd1" in suggests, suggests
    # apt would install nothing but the package itself: the guest (no network)
    # finds every dependency installed.
    plan = subprocess.run(["apt-get", "install", "--simulate", "--no-install-recommends",
                           str(deb)], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    installs = [line.split()[1] for line in plan.stdout.splitlines()
                if line.startswith("Inst ")]
    assert installs in ([], ["ublkd"]), plan.stdout  # [] when the host has it installed


# -- in the guest ------------------------------------------------------------------
def test_installed_package_serves_and_survives_kill_9(package, report):
    guest = package
    report(f"package guest: booted in {guest.boot_wall_seconds:.1f} s wall; logs in "
           f"{guest.log_dir}")
    assert package_status(guest) == ("installed", code_version())
    assert guest.run([UBLKD, "--version"]).stdout.strip() == f"ublkd {code_version()}"
    # Installing enables and starts nothing.
    units = guest.run("systemctl list-units --all --plain --no-legend 'ublkd@*' "
                      "'ublkd-*@*'").stdout
    assert units == "", units
    assert guest.run("systemctl is-enabled ublkd@vol0", check=False).stdout.strip() == \
        "disabled"
    # The man pages are installed: Documentation=man:... resolves.
    result = guest.run("systemd-analyze verify ublkd@vol0.service ublkd-giveup@vol0.service "
                       "ublkd-recover@vol0.service ublkd-dbus.service 2>&1", check=False)
    assert result.rc == 0 and result.stdout.strip() == "", result.describe()

    before = start_vol0(guest)
    unit = show(guest, "ublkd@vol0", "ExecStart", "FragmentPath", "MainPID")
    assert f"path={UBLKD} " in unit["ExecStart"], unit
    assert unit["FragmentPath"] == f"{UNIT_DIR}/ublkd@.service"
    maps = guest.read_file(f"/proc/{unit['MainPID']}/maps")  # the package's code runs
    assert f"{PYTHON_DIR}/kernel/_uring" in maps and str(CHECKOUT) not in maps
    dev = before["device"]
    number = devnum(guest, dev)
    mount_with_data(guest, dev)
    kill_and_wait_live(guest, "vol0")
    after = status(guest)
    assert after["pid"] != before["pid"] and after["state"] == "LIVE"
    assert devnum(guest, dev) == number
    assert f"{dev} {MNT} ext4" in guest.read_file("/proc/mounts")
    data_intact(guest)
    guest.run(f"umount {MNT} && e2fsck -fn {dev}")
    # The package's D-Bus API, started by the bus on the first call.
    state = guest.run("busctl get-property org.ublkd1 /org/ublkd1/devices/vol0 "
                      "org.ublkd1.Device State ServerPid").stdout.split("\n")
    assert state[:2] == ['s "LIVE"', f"u {after['pid']}"], state
    assert show(guest, "ublkd-dbus", "FragmentPath")["FragmentPath"] == \
        f"{UNIT_DIR}/ublkd-dbus.service"


def test_upgrade_under_fio_hands_the_device_over_to_the_new_version(package, debs, report):
    """vol-0 (reissue) is handed over under fio; nr (recovery = "none", which
    the kernel would remove with its daemon) stays with its daemon, named by
    postinst, its mount untouched."""
    guest = package
    if package_status(guest) != ("installed", code_version()):
        dpkg_install(guest, debs["base"])
    old_version, new_version = code_version(), next_version(code_version())
    name, mnt = HANDED_OVER, mount_point(HANDED_OVER)
    since = JournalSince(guest)
    before = start_vol0(guest, name)
    main_before = show(guest, f"ublkd@{name}", "MainPID")["MainPID"]
    dev = before["device"]
    number = devnum(guest, dev)
    mount_with_data(guest, dev, name)
    stays = start_vol0(guest, STAYS, 'recovery = "none"\n')
    stays_unit = show(guest, f"ublkd@{STAYS}", "MainPID", "NRestarts")
    stays_number = devnum(guest, stays["device"])
    mount_with_data(guest, stays["device"], STAYS)
    # Rounds of write-then-verify until the upgrade is over: I/O runs all along.
    fio, box = run_in_background(
        guest, f"rm -f /tmp/stop; rounds=0; until [ -e /tmp/stop ]; do "
               f"fio --name=upgrade --directory={mnt} --rw=randwrite --bs=4k --size=8M "
               f"--numjobs=2 --ioengine=libaio --iodepth=8 --direct=1 --fsync=32 "
               f"--verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null "
               f"|| exit 1; rounds=$((rounds + 1)); done; echo $rounds")
    guest.run("sleep 3")
    output = dpkg_install(guest, debs["next"])
    still_writing = fio.is_alive()
    guest.run("touch /tmp/stop")
    assert f"handing device {name} over to ublkd {new_version}" in output, output
    assert re.search(rf"{name}: {dev} handed over from pid {before['pid']} to pid \d+ "
                     rf"\(ublkd {re.escape(new_version)}\)", output), output
    assert "still served by the previous version" not in output, output
    assert f'{STAYS}: not handed over: {stays["device"]} was created with recovery = ' \
           f'"none"' in output, output
    assert re.search(r"these devices stay on the version serving them until their next\s+"
                     rf"planned restart .*: {STAYS}$", output, re.M), output
    assert still_writing, f"fio failed during the upgrade: {box and box[0].describe()}"
    fio.join(600)
    assert not fio.is_alive(), "fio still waits for I/O 10 minutes after the upgrade"
    assert box[0].rc == 0, box[0].describe()  # fio exits 1 on any I/O or verify error

    after = status(guest, name)
    assert package_status(guest) == ("installed", new_version)
    assert after["version"] == new_version and after["state"] == "LIVE"
    assert after["pid"] != before["pid"]
    assert devnum(guest, dev) == number
    assert f"{dev} {mnt} ext4" in guest.read_file("/proc/mounts")
    # Handed over (SIGUSR2) and recovered by the new process, never stopped
    # (SIGTERM deletes the device) nor created anew.
    assert after["generation"] == before["generation"] + 1
    unit = show(guest, f"ublkd@{name}", "ActiveState", "MainPID")
    assert unit["ActiveState"] == "active" and unit["MainPID"] != main_before, unit
    journal = since.of(f"ublkd@{name}")
    assert "SIGUSR2 received" in journal and "SIGTERM received" not in journal, journal
    assert journal.count(f"{name}: created {dev}") == 1, journal
    assert f"{name}: recovered {dev}" in journal, journal
    data_intact(guest, name)
    guest.run(f"umount {mnt} && e2fsck -fn {dev}")
    # The "none" device: the same daemon, device and mount, on the old version.
    assert status(guest, STAYS) == stays
    assert stays["version"] == old_version
    assert show(guest, f"ublkd@{STAYS}", "MainPID", "NRestarts") == stays_unit
    assert devnum(guest, stays["device"]) == stays_number
    assert f"{stays['device']} {mount_point(STAYS)} ext4" in guest.read_file("/proc/mounts")
    assert "SIGUSR2" not in since.of(f"ublkd@{STAYS}")
    data_intact(guest, STAYS)
    report(f"package upgrade {old_version} -> {new_version} under fio "
           f"({box[0].stdout.strip()} write+verify rounds): {name} pid {before['pid']} -> "
           f"{after['pid']}, no I/O error; {STAYS} (recovery none) stays on {old_version}")


def test_remove_is_refused_while_a_device_runs_and_purge_removes_the_state(package):
    guest = package
    version = package_status(guest)[1]  # the upgraded one, when run after the upgrade test
    before = start_vol0(guest)
    dev = before["device"]
    guest.run(f"head -c 4M /dev/urandom > /tmp/raw && dd if=/tmp/raw of={dev} bs=1M "
              f"oflag=direct status=none")
    refused = guest.run("dpkg -r ublkd 2>&1", check=False)
    assert refused.rc != 0, refused.describe()
    assert f"vol0 {dev} LIVE" in refused.stdout, refused.stdout
    assert "systemctl stop ublkd@NAME" in refused.stdout, refused.stdout
    # Still installed; the device and its daemon untouched.
    assert package_status(guest) == ("installed", version)
    assert status(guest)["pid"] == before["pid"]
    guest.run(f"test -x {UBLKD} && cmp -n 4194304 /tmp/raw {dev}")

    # Stopped first, as the message says: the removal goes through.  --purge
    # is remove and purge in one dpkg run.
    guest.run(f"systemctl stop ublkd@vol0 && test -d {STATE_DIR} && "
              f"echo '{{}}' > {STATE_DIR}/stale.json")
    guest.run("dpkg --purge ublkd", timeout=600)
    assert package_status(guest) in (("", ""), ("not-installed", ""))
    assert guest.run(f"test -e {UBLKD} || test -e {UNIT_DIR}/ublkd@.service || "
                     f"test -e {PYTHON_DIR}", check=False).rc == 1
    assert guest.run("systemctl cat ublkd@vol0.service", check=False).rc != 0
    # The state is gone; what the administrator made stays: the configuration
    # and the backing file.
    assert guest.run(f"test -e {STATE_DIR}", check=False).rc == 1
    guest.run(f"test -f /etc/ublkd/vol0.toml && test -f {BACKING}")
