"""ublkd installed the way the README allows besides the Debian package:
`pip install .` into a venv that sees nothing of Debian's python3 modules,
so the optional extra "systemd" (pystemd) is missing.

Every command must work or end in one line that says what is wrong and
what to do, never in a traceback. The host has no ublk driver and no
systemd, so the commands that need /dev/ublk-control end with exit 3 here
(serving is the guest tests' business); `upgrade` must name the package
that brings pystemd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ublkd.config import load_config
from ublkd.state import DeviceState, save_state

CHECKOUT = Path(__file__).resolve().parents[2]
# What a `git clone` does not have, or what a build must not pick up.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so",
                                    "__pycache__")
CONFIG = 'backend = "file"\npath = "{path}"\nsize = "16MiB"\n'
NO_DRIVER = "run `modprobe ublk_drv`"
COMMANDS = ("serve", "list", "status", "delete", "upgrade", "recover", "give-up", "features")

pytestmark = pytest.mark.skipif(
    Path("/dev/ublk-control").exists(),
    reason="this host has a ublk driver: the commands would act on real devices")


@pytest.fixture(scope="session")
def venv(tmp_path_factory) -> Path:
    """A venv without system site packages, with the checkout pip-installed into it.

    The checkout is copied first: an in-tree build would write build/ and
    ublkd.egg-info into it, next to the test bed's logs and other runs'.
    """
    root = tmp_path_factory.mktemp("pip-install")
    source = root / "ublkd"
    shutil.copytree(CHECKOUT, source, ignore=NOT_COPIED)
    env = root / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(source)], check=True, cwd=root)
    return env


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """Config and state of device vol0 in private directories: the environment
    for running the installed ublkd."""
    conf_dir, state_dir = tmp_path / "conf", tmp_path / "state"
    conf_dir.mkdir()
    (conf_dir / "vol0.toml").write_text(CONFIG.format(path=tmp_path / "vol0.img"))
    config = load_config("vol0", conf_dir)
    save_state(DeviceState(name="vol0", dev_id=0, flags=0, params={"dev_sectors": 32768},
                           config=config.to_dict(), pid=1 << 22, generation=1,
                           created="2026-01-01T00:00:00+00:00",
                           updated="2026-01-01T00:00:00+00:00"), state_dir)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
    return {**env, "UBLKD_CONF_DIR": str(conf_dir), "UBLKD_STATE_DIR": str(state_dir)}


def run(venv: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The installed `ublkd`, run outside the checkout so that only the
    installed package can be imported."""
    result = subprocess.run([str(venv / "bin" / "ublkd"), *args], env=env, cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_line(result: subprocess.CompletedProcess) -> str:
    """The error message, which must be the only line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_venv_has_no_pystemd_and_its_own_ublkd(venv):
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.util as u, ublkd; print(u.find_spec('pystemd'), ublkd.__file__)"],
        cwd="/", capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    spec, path = probe.stdout.split()
    assert spec == "None"
    assert Path(path).is_relative_to(venv), path


def test_version_and_help(venv, home):
    assert run(venv, home, "--version").stdout.strip() == "ublkd 0.1.0"
    help_text = run(venv, home, "--help").stdout
    assert "8  an optional Python package is missing" in help_text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(venv, home, command):
    result = run(venv, home, command, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: ublkd {command}")


@pytest.mark.parametrize("args", [
    ("serve", "vol0"), ("list",), ("list", "--json"), ("status", "vol0"), ("delete", "vol0"),
    ("recover", "vol0"), ("give-up", "vol0"), ("give-up", "--delete", "vol0"),
    ("give-up", "gone"), ("features",),
])
def test_commands_that_need_the_driver_say_how_to_load_it(venv, home, args):
    result = run(venv, home, *args)
    assert result.returncode == 3, result.stderr
    assert NO_DRIVER in one_line(result)


def test_upgrade_names_the_package_that_brings_pystemd(venv, home):
    result = run(venv, home, "upgrade", "vol0")
    assert result.returncode == 8, result.stderr
    message = one_line(result)
    assert "ublkd@vol0.service" in message
    assert "python3-pystemd" in message and "pip install 'ublkd[systemd]'" in message


@pytest.mark.parametrize("args, code, says", [
    (("serve", "gone"), 2, "gone.toml"),
    (("serve", "../vol0"), 2, "../vol0"),
    ((), 2, "required: COMMAND"),
    (("frobnicate",), 2, "invalid choice"),
])
def test_commands_without_the_driver_or_systemd_work_or_say_why(venv, home, args, code, says):
    result = run(venv, home, *args)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
