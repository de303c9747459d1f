"""ublkd_nbd.h declares libnbd's API itself (libnbd is loaded at run time,
never built against): its constants and the callback's layout must be
libnbd.h's.  libnbd-dev comes with scripts/bootstrap."""

import re
from pathlib import Path

from tests.unit.c_checks import KERNEL_DIR, assert_compiles
from ublkd.kernel._uring import ffi, lib

LIBNBD_HEADER = Path("/usr/include/libnbd.h")


def our_constants() -> list[str]:
    """The X of every UBLKD_NBD_X our header defines."""
    return re.findall(r"^#define UBLKD_NBD_(\w+) ", (KERNEL_DIR / "ublkd_nbd.h").read_text(),
                      re.M)


def checks_against_libnbd_h(names: list[str]) -> str:
    """A C file that compiles only if our declarations agree with libnbd.h."""
    lines = ["#include <stddef.h>", "#include <libnbd.h>", '#include "ublkd_nbd.h"']
    lines += [f'_Static_assert(UBLKD_NBD_{name} == LIBNBD_{name}, "{name}");' for name in names]
    for member in ("callback", "user_data", "free"):
        lines.append(f"_Static_assert(offsetof(struct ublkd_nbd_completion, {member}) == "
                     f'offsetof(nbd_completion_callback, {member}), "{member}");')
    lines.append("_Static_assert(sizeof(struct ublkd_nbd_completion) == "
                 'sizeof(nbd_completion_callback), "size");')
    return "\n".join(lines) + "\n"


def test_constants_and_callback_match_libnbd_h(tmp_path):
    names = our_constants()
    assert len(names) >= 10
    assert_compiles(tmp_path, LIBNBD_HEADER, checks_against_libnbd_h(names))


def test_a_missing_server_is_an_error_with_libnbd_s_message():
    error = ffi.new("char[]", 256)
    assert lib.ublkd_nbd_load(error, 256) == 0, ffi.string(error)
    export = ffi.new("struct ublkd_nbd_export *")
    errno = ffi.new("int *")
    uri = b"nbd+unix:///?socket=/nonexistent/ublkd-test.sock"
    assert lib.ublkd_nbd_probe(uri, b"test", export, errno, error, 256) == -1
    assert errno[0] == 2 and b"No such file or directory" in ffi.string(error)
