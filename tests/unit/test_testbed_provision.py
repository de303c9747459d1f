"""Pure logic of the test bed's provisioning (no qemu, no apt)."""

import pytest

from tests.testbed import provision
from tests.testbed.guest import Result

APT_SEARCH = """\
linux-image-6.12.107+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.99+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-rt-amd64-unsigned - Linux 6.12 for 64-bit PCs, PREEMPT_RT
linux-image-6.12.111+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
"""


def test_newest_generic_kernel_is_chosen_by_number_not_text():
    # 111 > 107 > 99 numerically, while "99" sorts last as text; cloud and
    # rt flavours are ignored even when newer.
    newest = "linux-image-6.12.111+deb12-amd64-unsigned"
    assert provision.choose_kernel_package(APT_SEARCH, provision.KERNEL_LINES["6.12"]) == newest


def test_the_newer_line_takes_debian_13s_signed_image():
    line = provision.KERNEL_LINES["6.18"]
    search = ("linux-image-6.18.15+deb13-amd64 - Linux 6.18 for 64-bit PCs (signed)\n"
              "linux-image-6.18.9+deb13-amd64 - Linux 6.18 for 64-bit PCs (signed)\n"
              "linux-image-6.18.15+deb13-cloud-amd64 - Linux 6.18 for x86-64 cloud\n")
    package = provision.choose_kernel_package(search, line)
    assert package == "linux-image-6.18.15+deb13-amd64"
    assert line.version_of(package) == "6.18.15+deb13-amd64"
    assert "trixie-backports" in line.sources


def test_private_apt_reads_only_its_own_sources(tmp_path):
    options = provision.private_apt(provision.KERNEL_LINES["6.18"], tmp_path)
    assert f"Dir::Etc::sourcelist={tmp_path}/apt/6.18/sources.list" in options
    assert "Dir::Etc::sourceparts=-" in options
    assert provision.private_apt(provision.KERNEL_LINES["6.12"], tmp_path) == []


def test_no_kernel_known_says_what_to_do():
    with pytest.raises(provision.ProvisionError, match="apt-get update"):
        provision.choose_kernel_package("linux-image-6.1.0-9-amd64 - Linux 6.1\n",
                                        provision.KERNEL_LINES["6.12"])


def test_an_unknown_kernel_line_names_the_known_ones():
    with pytest.raises(provision.ProvisionError, match="6.12, 6.18"):
        provision.kernel_line("5.10")


def test_initramfs_key_follows_its_inputs(tmp_path, monkeypatch):
    for name in ("init.sh", "agent.py"):
        (tmp_path / name).write_text(name)
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "a.service").write_text("[Unit]\n")
    monkeypatch.setattr(provision, "HERE", tmp_path)
    before = provision.initramfs_key("6.12.1+deb12-amd64")
    assert provision.initramfs_key("6.12.2+deb12-amd64") != before
    (tmp_path / "units" / "a.service").write_text("[Unit]\nDescription=changed\n")
    assert provision.initramfs_key("6.12.1+deb12-amd64") != before


def test_failed_command_description_carries_both_streams():
    text = Result(argv=["sh", "-c", "x"], rc=2, stdout="out\n", stderr="err\n").describe()
    assert "exited 2" in text and "out" in text and "err" in text
    timed_out = Result(argv=["sleep", "9"], rc=-9, stdout="", stderr="", timed_out=True)
    assert "timed out" in timed_out.describe()
