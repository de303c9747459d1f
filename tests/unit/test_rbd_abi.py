"""ublkd_rbd.h declares librbd's and librados' API itself (they are loaded
at run time, never built against): its constants, the watcher record and
every function's type must be those of librbd.h and librados.h.
librbd-dev comes with scripts/bootstrap."""

import re
from pathlib import Path

from tests.unit.c_checks import KERNEL_DIR, assert_compiles
from ublkd.kernel._uring import ffi, lib

LIBRBD_HEADER = Path("/usr/include/rbd/librbd.h")
# Functions whose parameters name librbd's own enum or struct, which C
# does not count as the same type as ours: checked through the layout.
LAYOUT_CHECKED = ("rbd_lock_acquire", "rbd_lock_get_owners", "rbd_lock_break",
                  "rbd_watchers_list", "rbd_watchers_list_cleanup")


def our_functions() -> list[str]:
    """The members of struct ublkd_rbd_api: librbd's and librados' names."""
    header = (KERNEL_DIR / "ublkd_rbd.h").read_text()
    api = header[header.index("struct ublkd_rbd_api {"):header.index("extern struct")]
    return re.findall(r"\(\*(\w+)\)", api)


def checks_against_librbd_h(functions: list[str]) -> str:
    """A C file that compiles only if our declarations agree with librbd.h."""
    lines = ["#include <stddef.h>", "#include <rbd/librbd.h>", '#include "ublkd_rbd.h"',
             "_Static_assert(UBLKD_RBD_LOCK_MODE_EXCLUSIVE == RBD_LOCK_MODE_EXCLUSIVE, "
             '"lock mode");',
             "_Static_assert(sizeof(rbd_lock_mode_t) == sizeof(int), \"lock mode size\");",
             "_Static_assert(UBLKD_RADOS_OP_FLAG_FADVISE_FUA == LIBRADOS_OP_FLAG_FADVISE_FUA, "
             '"FUA");',
             "_Static_assert(sizeof(struct ublkd_rbd_watcher) == sizeof(rbd_image_watcher_t), "
             '"watcher size");']
    for member in ("addr", "id", "cookie"):
        lines.append(f"_Static_assert(offsetof(struct ublkd_rbd_watcher, {member}) == "
                     f'offsetof(rbd_image_watcher_t, {member}), "{member}");')
    for name in functions:
        if name not in LAYOUT_CHECKED:
            lines.append(f"_Static_assert(__builtin_types_compatible_p(__typeof__(&{name}), "
                         f'__typeof__(ublkd_rbd.{name})), "{name}");')
    return "\n".join(lines) + "\n"


def test_constants_layout_and_functions_match_librbd_h(tmp_path):
    functions = our_functions()
    assert len(functions) >= 30
    assert_compiles(tmp_path, LIBRBD_HEADER, checks_against_librbd_h(functions))


def test_a_missing_ceph_conf_is_an_error_naming_the_step():
    error = ffi.new("char[]", 256)
    assert lib.ublkd_rbd_load(error, 256) == 0, ffi.string(error)
    target = ffi.new("struct ublkd_rbd_target *")
    conf = ffi.new("char[]", b"/nonexistent/ceph.conf")
    client = ffi.new("char[]", b"admin")
    pool = ffi.new("char[]", b"rbd")
    image = ffi.new("char[]", b"img")
    target.conf, target.client, target.pool, target.image = conf, client, pool, image
    target.connect_timeout = 5
    facts = ffi.new("struct ublkd_rbd_facts *")
    errno = ffi.new("int *")
    assert lib.ublkd_rbd_open(target, facts, errno, error, 256) == ffi.NULL
    assert errno[0] == 2 and ffi.string(error).startswith(b"reading the ceph.conf: ")
