"""Build recipe of ``ublkd.kernel._uring``, the C side of ``uring.py``.

cffi out-of-line API mode: in liburing 2.3 (Debian 12) ``io_uring_get_sqe``
and every ``io_uring_prep_*`` are static inline, so they only exist once
compiled.  The C functions of ublkd_uring.c (declared in ublkd_uring.h,
whose part between the "cffi begin" and "cffi end" comments cffi reads
too) are compiled against liburing.h and are all
Python ever calls: each fills one whole SQE per call (no Python struct
handling on the per-I/O path), ``ublkd_reap`` copies every ready CQE into
two arrays and advances the CQ in a single call, and ``ublkd_queue_serve``
is a queue's whole serving loop.

setup.py names this file in ``cffi_modules``; ``python
ublkd/kernel/_uring_build.py`` builds the module in place by hand.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from cffi import FFI

HEADER = "liburing.h"
HERE = Path(__file__).resolve().parent
C_SOURCES = (HERE / "ublkd_uring.c", HERE / "ublkd_nbd.c", HERE / "ublkd_rbd.c")
# Every warning is an error: C mistakes on the per-I/O path are memory
# corruption in a storage daemon, and a warning is often the only sign.
C_WARNINGS = ("-Wall", "-Wextra", "-Werror")
INCLUDE_DIRS = ("/usr/include", "/usr/local/include")

# liburing's part: what Python calls of liburing itself.
LIBURING_CDEF = """
struct io_uring;

#define IORING_SETUP_COOP_TASKRUN ...
#define IORING_SETUP_SQE128 ...
#define IORING_SETUP_SINGLE_ISSUER ...
#define IORING_SETUP_TASKRUN_FLAG ...
#define IORING_FSYNC_DATASYNC ...

int io_uring_submit(struct io_uring *ring);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
"""
# Our part is read from the headers, between their "cffi begin" and "cffi end"
# comments: C and Python declare it once.
HEADERS = (HERE / "ublkd_uring.h", HERE / "ublkd_nbd.h", HERE / "ublkd_rbd.h")
CFFI_PART = re.compile(r"/\* cffi begin \*/\n(.*?)/\* cffi end \*/", re.S)
DEFINE = re.compile(r"^#define (\w+) .*$", re.M)


def cffi_part(header: Path) -> str:
    """The declarations of `header` that Python calls.  cdef takes a #define
    only as a plain number, so each value becomes `...`: the compiler fills
    it in from the header itself."""
    found = CFFI_PART.search(header.read_text())
    if found is None:
        sys.exit(f"ublkd: {header} has no /* cffi begin */ ... /* cffi end */ part")
    return DEFINE.sub(r"#define \1 ...", found.group(1))


CDEF = LIBURING_CDEF + "".join(cffi_part(header) for header in HEADERS)


def find_liburing_header() -> Path | None:
    """liburing.h in the usual include directories, or None."""
    extra = [d for var in ("CPATH", "C_INCLUDE_PATH")
             for d in os.environ.get(var, "").split(os.pathsep) if d]
    for directory in (*extra, *INCLUDE_DIRS):
        candidate = Path(directory) / HEADER
        if candidate.is_file():
            return candidate
    return None


def make_ffibuilder() -> FFI:
    """The FFI builder; stops the build with the fix if liburing.h is missing."""
    if find_liburing_header() is None:
        sys.exit(
            "ublkd: cannot build ublkd.kernel._uring: liburing.h not found. "
            "Install liburing's headers (Debian/Ubuntu: apt-get install liburing-dev; "
            "Fedora: dnf install liburing-devel) and build again."
        )
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source("ublkd.kernel._uring", '#include "ublkd_uring.h"\n#include "ublkd_nbd.h"\n'
                       '#include "ublkd_rbd.h"',
                       sources=[os.path.relpath(source) for source in C_SOURCES],
                       include_dirs=[str(HERE)],
                       libraries=["uring"], extra_compile_args=list(C_WARNINGS))
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(Path(__file__).resolve().parents[2]), verbose=True)
