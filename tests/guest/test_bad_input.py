"""Bad input gets a clear error, a non-zero exit code, and leaves nothing behind."""

from __future__ import annotations

import pytest

from tests.guest.serving import CHECKOUT, ServedDevice, leftovers, ublkd, write_config


def serve_fails(guest, name: str, exit_code: int, *needles: str) -> str:
    result = ublkd(guest, "serve", name, check=False, timeout=120)
    assert result.rc == exit_code, result.describe()
    for needle in needles:
        assert needle in result.stderr, result.describe()
    assert leftovers(guest) == ""
    return result.stderr


@pytest.mark.parametrize(
    "config, exit_code, needles",
    [
        ('backend = "floppy"\n', 2, ["/etc/ublkd/bad.toml", "backend", "floppy", "file"]),
        ('backend = "file"\npath = "/var/tmp/absent.img"\n', 6,
         ["/var/tmp/absent.img", "does not exist", "size"]),
        ('backend = "null"\nsize = "1000"\n', 2, ["size", "512"]),
        ('backend = "null"\nsize = "1GiB"\nqueus = 2\n', 2, ["queus", "unknown"]),
        ('backend = "null"\nsize = "1GiB"\nqueues = "two"\n', 2, ["queues"]),
    ],
    ids=["unknown-backend", "missing-file-without-size", "size-not-block-multiple",
         "unknown-key", "wrong-type"],
)
def test_bad_config_is_refused(clean_guest, config, exit_code, needles):
    write_config(clean_guest, "bad", config)
    serve_fails(clean_guest, "bad", exit_code, *needles)


def test_missing_config_names_the_file(clean_guest):
    serve_fails(clean_guest, "nosuch", 2, "/etc/ublkd/nosuch.toml")


def test_backing_file_too_small(clean_guest):
    clean_guest.run("truncate -s 1M /var/tmp/small.img")
    write_config(clean_guest, "small",
                 'backend = "file"\npath = "/var/tmp/small.img"\nsize = "8MiB"\n')
    serve_fails(clean_guest, "small", 6, "/var/tmp/small.img", "smaller than", "truncate")


@pytest.mark.parametrize("name", ["../etc", "a/b", ".."])
def test_bad_names_are_refused(clean_guest, name):
    serve_fails(clean_guest, name, 2, "ublkd@")


def test_taken_id_is_refused_and_the_owner_keeps_running(clean_guest):
    guest = clean_guest
    write_config(guest, "first", 'backend = "null"\nsize = "64MiB"\nid = 7\n')
    write_config(guest, "second", 'backend = "null"\nsize = "64MiB"\nid = 7\n')
    first = ServedDevice(guest, "first").start()
    assert first.dev_id == 7
    result = ublkd(guest, "serve", "second", check=False)
    assert result.rc == 5 and "id = 7 is taken" in result.stderr, result.describe()
    assert guest.run("test -e /var/lib/ublkd/second.json", check=False).rc == 1
    assert ublkd(guest, "status", "first", "--json").stdout.count('"LIVE"') == 1
    first.stop()


def test_driver_not_loaded_says_modprobe(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", 'backend = "null"\nsize = "64MiB"\n')
    guest.run("rmmod ublk_drv")
    try:
        serve_fails(guest, "vol0", 3, "modprobe ublk_drv")
    finally:
        guest.run("modprobe ublk_drv")


def test_not_root_is_refused(clean_guest):
    guest = clean_guest
    write_config(guest, "vol0", 'backend = "null"\nsize = "64MiB"\n')
    # The checkout may live under a directory only root can enter (mktemp -d
    # makes 0700 ones), so nobody runs a world-readable copy of the package:
    # what is tested is ublkd's own check, not the checkout's permissions.
    copy = "/tmp/ublkd-as-nobody"
    guest.run(f"rm -rf {copy} && mkdir -p {copy} && cp -a {CHECKOUT}/ublkd {copy}/ "
              f"&& chmod -R a+rX {copy}")
    result = guest.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "env", f"PYTHONPATH={copy}", "/usr/bin/python3", "-m", "ublkd",
                        "serve", "vol0"], check=False)
    assert result.rc == 3 and "root" in result.stderr, result.describe()
    assert leftovers(guest) == ""


MAKE_SOCKET = ("/usr/bin/python3 -c 'import socket; "
               "socket.socket(socket.AF_UNIX).bind(\"/var/tmp/vol0.sock\")'")


@pytest.mark.parametrize(
    "path, make, kind",
    [("/var/tmp", "true", "a directory"),
     ("/dev/null", "true", "a character device"),
     ("/var/tmp/vol0.fifo", "mkfifo /var/tmp/vol0.fifo", "a FIFO"),
     ("/var/tmp/vol0.sock", MAKE_SOCKET, "a socket")],
    ids=["directory", "char-device", "fifo", "socket"],
)
def test_path_of_the_wrong_kind_is_a_config_error(clean_guest, path, make, kind):
    # Exit 2, which ublkd@ does not restart; a FIFO is not opened (that could
    # block): serve_fails bounds the run at 120 s.
    clean_guest.run(make)
    try:
        write_config(clean_guest, "wrong",
                     f'backend = "file"\npath = "{path}"\nsize = "64MiB"\n')
        serve_fails(clean_guest, "wrong", 2, f'path = "{path}"', f"is {kind}")
    finally:
        clean_guest.run("rm -f /var/tmp/vol0.fifo /var/tmp/vol0.sock")


def test_missing_directory_of_the_path_is_retried(clean_guest):
    # Exit 6, which ublkd@ restarts: the file system holding it may not be
    # mounted yet.
    write_config(clean_guest, "unmounted",
                 'backend = "file"\npath = "/mnt/not-mounted/vol0.img"\nsize = "64MiB"\n')
    serve_fails(clean_guest, "unmounted", 6, "/mnt/not-mounted", "not mounted yet")
