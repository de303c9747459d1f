"""Everything the guest needs on the host, fetched once and cached.

The host kernel has no ublk driver, so the suite boots Debian's kernels
under qemu: 6.12 (Debian 12's) for everything, 6.18 (Debian 13's, from
trixie-backports) for the newer driver's features.  This module installs the
host tools, downloads a kernel package, unpacks it and builds the
initramfs, all under one cache directory so that a second run costs
nothing.  A newer kernel in the archive, or a change to the initramfs
inputs, lands in a new cache entry by itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Tools the harness and the guest tests run.  The guest sees the host's root
# file system, so installing them here installs them there too.  That
# includes the guest's init and its bus (systemd, dbus) and what the tests
# call in the guest (ps/pkill, dmsetup): the workplace images happen to have
# those, a plain Debian 12 does not (make check-fresh, docs/testbed.md).
HOST_PACKAGES = (
    "systemd",
    "dbus",
    "procps",
    "dmsetup",
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "cpio",
    "xz-utils",
    "fio",
    "e2fsprogs",
    "util-linux",
    "strace",
    "udev",
    # NBD servers and clients for the nbd backend's tests and benchmark
    # (docs/nbd.md): qemu-nbd, nbdkit, nbd-server, the kernel's client,
    # nbdinfo, and libnbd's header for the constants test.
    "qemu-utils",
    "nbdkit",
    "nbd-server",
    "nbd-client",
    "libnbd-bin",
    "libnbd-dev",
    # A one-node Ceph cluster for the rbd backend's tests and benchmark
    # (docs/rbd.md; tests/guest/ceph-cluster), the kernel's and rbd-nbd's
    # mappings to compare with, and librbd's headers for the constants test.
    "ceph-mon",
    "ceph-osd",
    "ceph-common",
    "rbd-nbd",
    "librbd-dev",
    # The D-Bus API's tests (tests/guest/test_dbus.py): polkit decides for
    # callers that are not root; pydbus (scripts/bootstrap) is the client.
    "polkitd",
)

# Modules the initramfs loads to reach the 9p root; everything else comes
# from the full module tree once the root is mounted.
INITRAMFS_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p", "overlay")

# Units masked in the guest.  systemd-tmpfiles-setup walks the whole 9p root
# and took 20 of the 28 s of userspace boot; the host root already has the
# directories it would create, and /run and /tmp start empty anyway.
# nbd-server and nbd-client come enabled: the tests start their own servers.
MASKED_UNITS = ("systemd-tmpfiles-setup.service", "nbd-server.service", "nbd-client.service")

class ProvisionError(RuntimeError):
    """The host could not be prepared; the message says which step and why."""


@dataclass(frozen=True)
class KernelBuild:
    """A kernel unpacked in the cache: what qemu boots and the guest modprobes."""

    line: str  # "6.12" or "6.18": which of KERNEL_LINES
    version: str  # uname -r, e.g. "6.12.117+deb12-amd64"
    root: Path  # the unpacked package
    vmlinuz: Path
    modules: Path  # root/lib/modules/<version>
    initramfs: Path


def cache_dir() -> Path:
    """Where downloads and builds live; UBLKD_TESTBED_CACHE moves it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ublkd-testbed"
    return Path(os.environ.get("UBLKD_TESTBED_CACHE", default))


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a host command, turning a failure into a ProvisionError with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise ProvisionError(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def missing_packages(packages: tuple[str, ...] = HOST_PACKAGES) -> list[str]:
    """Debian packages of `packages` that are not installed."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
        capture_output=True,
        text=True,
    )
    installed = {
        line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" installed")
    }
    return [p for p in packages if p not in installed]


def apt_get_update() -> None:
    """Refresh the package lists (a fresh machine has none, or stale ones)."""
    run(["apt-get", "update", "-qq"])


def install_host_packages() -> None:
    """apt-get install what is missing; a no-op on a prepared machine."""
    missing = missing_packages()
    if not missing:
        return
    apt_get_update()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


@dataclass(frozen=True)
class KernelLine:
    """A kernel series the suite boots, and where apt finds its packages.

    6.12 is Debian 12's own (bookworm and its updates, the host's sources).
    6.18 is Debian 13's from trixie-backports: a suite this host must not
    install from, so apt reads it through a private configuration in the
    cache (`private_apt`), never through /etc/apt.
    """

    name: str
    package_re: re.Pattern
    search: str  # the regex `apt-cache search --names-only` takes
    where: str  # for the error when apt knows no such package
    sources: str = ""  # a private sources.list; "" means the host's

    def version_of(self, package: str) -> str:
        """uname -r of a package of this line."""
        return self.package_re.match(package).group(1) + "-amd64"


KERNEL_LINES = {
    line.name: line
    for line in (
        KernelLine(
            name="6.12",
            package_re=re.compile(r"^linux-image-(6\.12\.(\d+)\+deb12)-amd64-unsigned$"),
            search=r"^linux-image-6\.12\..*-amd64-unsigned$",
            where="bookworm-backports or bookworm's security/updates archive",
        ),
        KernelLine(
            name="6.18",
            # Debian 13 ships the generic image signed only: no -unsigned package.
            package_re=re.compile(r"^linux-image-(6\.18\.(\d+)\+deb13)-amd64$"),
            search=r"^linux-image-6\.18\..*\+deb13-amd64$",
            where="trixie-backports",
            sources="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                    "http://deb.debian.org/debian trixie-backports main\n",
        ),
    )
}
DEFAULT_KERNEL = "6.12"


def kernel_line(name: str | None = None) -> KernelLine:
    """The line `name`, else UBLKD_TESTBED_KERNEL's, else 6.12."""
    name = name or os.environ.get("UBLKD_TESTBED_KERNEL") or DEFAULT_KERNEL
    try:
        return KERNEL_LINES[name]
    except KeyError:
        raise ProvisionError(f"unknown test bed kernel {name!r}: choose one of "
                             f"{', '.join(KERNEL_LINES)} (UBLKD_TESTBED_KERNEL)") from None


def private_apt(line: KernelLine, cache: Path) -> list[str]:
    """apt options that read only `line`'s private sources, lists and cache.

    Empty for a line the host's own sources carry.  The private lists are
    refreshed by `apt_get_update(line)` like the host's.
    """
    if not line.sources:
        return []
    base = cache / "apt" / line.name
    (base / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (base / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = base / "sources.list"
    if not sources.exists() or sources.read_text() != line.sources:
        sources.write_text(line.sources)
    return [
        "-o", f"Dir::Etc::sourcelist={sources}",
        "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::Cache={base}",
        "-o", "APT::Sandbox::User=root",
    ]


def choose_kernel_package(apt_search_output: str, line: KernelLine) -> str:
    """The newest generic amd64 kernel of `line` in `apt-cache search` output.

    Only the generic flavour: the cloud one lacks drivers qemu's default
    machine uses, and the rt one changes the timing the tests see.
    """
    best: tuple[int, str] | None = None
    for entry in apt_search_output.splitlines():
        name = entry.split(" - ", 1)[0].strip()
        match = line.package_re.match(name)
        if match and (best is None or int(match.group(2)) > best[0]):
            best = (int(match.group(2)), name)
    if best is None:
        raise ProvisionError(
            f"no {line.name} kernel package ({line.search}) is known to apt; "
            f"run `apt-get update` (it comes from {line.where})"
        )
    return best[1]


def newest_kernel_package(line: KernelLine, cache: Path) -> str:
    """Ask apt which kernel of `line` is newest, refreshing its lists once if needed."""
    apt = private_apt(line, cache)
    search = ["apt-cache", *apt, "search", "--names-only", line.search]
    try:
        return choose_kernel_package(run(search).stdout, line)
    except ProvisionError:
        run(["apt-get", *apt, "update", "-qq"])
        return choose_kernel_package(run(search).stdout, line)


def unpack_kernel(package: str, line: KernelLine, cache: Path) -> Path:
    """Download and unpack `package` once; returns the unpacked tree.

    The tree always has its modules under lib/modules: Debian 13's packages
    put them under usr/lib/modules (merged /usr), so a link bridges the two
    for depmod and for the guest's bind mount.
    """
    version = line.version_of(package)
    root = cache / "kernel" / version
    if (root / ".complete").exists():
        return root
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = list(downloads.glob(f"{package}_*.deb"))
    if not debs:
        # apt drops privileges to _apt for downloads; a root-owned cache
        # makes it warn, so download in a scratch dir it may write.
        with tempfile.TemporaryDirectory() as scratch:
            os.chmod(scratch, 0o777)
            run(["apt-get", *private_apt(line, cache), "download", "-qq", package], cwd=scratch)
            for deb in Path(scratch).glob("*.deb"):
                shutil.move(str(deb), downloads / deb.name)
        debs = list(downloads.glob(f"{package}_*.deb"))
    staging = root.with_name(root.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    run(["dpkg-deb", "-x", str(debs[0]), str(staging)])
    if not (staging / "lib" / "modules").exists():
        (staging / "lib").mkdir(exist_ok=True)
        (staging / "lib" / "modules").symlink_to("../usr/lib/modules")
    run(["depmod", "-b", str(staging), version])
    (staging / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def module_file(modules: Path, name: str) -> Path:
    """The .ko(.xz) file of module `name` in a module tree."""
    for candidate in modules.rglob(f"{name}.ko*"):
        return candidate
    raise ProvisionError(f"module {name} not found under {modules}")


def initramfs_inputs() -> list[Path]:
    """Files whose content decides the initramfs; a change rebuilds it."""
    return sorted([HERE / "init.sh", HERE / "agent.py", *(HERE / "units").iterdir()])


def initramfs_key(version: str) -> str:
    # The busybox binary is an input too, but it may not be installed yet
    # (a fresh machine, before provisioning): its path, if any, stands for it.
    digest = hashlib.sha256(version.encode())
    digest.update((shutil.which("busybox") or "busybox not installed").encode())
    digest.update(" ".join(MASKED_UNITS).encode())
    for path in initramfs_inputs():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_initramfs(version: str, modules: Path, target: Path) -> None:
    """A busybox initramfs that mounts the host root over 9p and starts systemd.

    The unit files in units/ travel inside it and are copied into the guest's
    /etc/systemd/system by init.sh, so the guest needs nothing written on the
    host's file system.
    """
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch)
        for sub in ("bin", "dev", "proc", "sys", "newroot", "modules",
                    "overlay/etc/systemd/system"):
            (tree / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shutil.which("busybox"), tree / "bin" / "busybox")
        shutil.copy2(HERE / "init.sh", tree / "init")
        os.chmod(tree / "init", 0o755)
        for name in INITRAMFS_MODULES:
            source = module_file(modules, name)
            dest = tree / "modules" / f"{name}.ko"
            if source.suffix == ".xz":
                with open(dest, "wb") as out:
                    subprocess.run(["xz", "-dc", str(source)], stdout=out, check=True)
            else:
                shutil.copy2(source, dest)
        unit_dir = tree / "overlay/etc/systemd/system"
        for unit in (HERE / "units").iterdir():
            shutil.copy2(unit, unit_dir / unit.name)
        for unit in MASKED_UNITS:
            (unit_dir / unit).symlink_to("/dev/null")
        agent_dir = tree / "overlay/usr/lib/ublkd-testbed"
        agent_dir.mkdir(parents=True)
        shutil.copy2(HERE / "agent.py", agent_dir / "agent.py")
        (tree / "modules" / "load-order").write_text("\n".join(INITRAMFS_MODULES) + "\n")
        files = run(["find", "."], cwd=tree).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input=files.encode(),
            cwd=tree,
            capture_output=True,
            check=True,
        ).stdout
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(cpio)
        partial.rename(target)


def prepare(install: bool = True, line: str | None = None) -> KernelBuild:
    """Make sure the host can boot the guest on kernel `line` (default: 6.12,
    or UBLKD_TESTBED_KERNEL); cheap when the cache is warm."""
    if install:
        install_host_packages()
    cache = cache_dir()
    kernel = kernel_line(line)
    package = os.environ.get("UBLKD_TESTBED_KERNEL_PACKAGE", "")
    if not kernel.package_re.match(package):
        package = cached_or_newest_package(kernel, cache)
    root = unpack_kernel(package, kernel, cache)
    version = root.name
    modules = (root / "lib" / "modules" / version).resolve()
    initramfs = root / f"initramfs-{initramfs_key(version)}.cpio"
    if not initramfs.exists():
        for stale in root.glob("initramfs-*.cpio"):
            stale.unlink()
        build_initramfs(version, modules, initramfs)
    return KernelBuild(
        line=kernel.name,
        version=version,
        root=root,
        vmlinuz=root / "boot" / f"vmlinuz-{version}",
        modules=modules,
        initramfs=initramfs,
    )


def cached_or_newest_package(line: KernelLine, cache: Path) -> str:
    """The newest kernel of `line` apt knows; remembered for a day so warm
    runs skip apt.

    A changed answer (a new point release in the archive) unpacks a new
    kernel into its own cache entry; the old one stays until removed.
    """
    memo = cache / ("kernel-package" if line.name == DEFAULT_KERNEL
                    else f"kernel-package-{line.name}")
    if memo.exists() and time.time() - memo.stat().st_mtime < 86400:
        return memo.read_text().strip()
    package = newest_kernel_package(line, cache)
    cache.mkdir(parents=True, exist_ok=True)
    memo.write_text(package + "\n")
    return package
