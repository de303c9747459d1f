"""Build recipe of ``ublkd.kernel._uring``, the C side of ``uring.py``.

cffi out-of-line API mode: in liburing 2.3 (Debian 12) ``io_uring_get_sqe``
and every ``io_uring_prep_*`` are static inline, so they only exist once
compiled.  The C functions of ublkd_uring.c (declared in ublkd_uring.h,
and again below for cffi) are compiled against liburing.h and are all
Python ever calls: each fills one whole SQE per call (no Python struct
handling on the per-I/O path), ``ublkd_reap`` copies every ready CQE into
two arrays and advances the CQ in a single call, and ``ublkd_queue_serve``
is a queue's whole serving loop.

setup.py names this file in ``cffi_modules``; ``python
ublkd/kernel/_uring_build.py`` builds the module in place by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HEADER = "liburing.h"
HERE = Path(__file__).resolve().parent
C_SOURCES = (HERE / "ublkd_uring.c", HERE / "ublkd_nbd.c")
# Every warning is an error: C mistakes on the per-I/O path are memory
# corruption in a storage daemon, and a warning is often the only sign.
C_WARNINGS = ("-Wall", "-Wextra", "-Werror")
INCLUDE_DIRS = ("/usr/include", "/usr/local/include")

CDEF = """
struct io_uring;

#define IORING_SETUP_COOP_TASKRUN ...
#define IORING_SETUP_SQE128 ...
#define IORING_SETUP_SINGLE_ISSUER ...
#define IORING_SETUP_DEFER_TASKRUN ...
#define IORING_FSYNC_DATASYNC ...

struct io_uring *ublkd_ring_new(unsigned entries, unsigned flags, int *err);
void ublkd_ring_free(struct io_uring *ring);
int ublkd_ring_fd(struct io_uring *ring);
unsigned ublkd_ring_flags(struct io_uring *ring);
unsigned ublkd_sq_entries(struct io_uring *ring);
unsigned ublkd_cq_entries(struct io_uring *ring);
unsigned ublkd_sq_space(struct io_uring *ring);
unsigned ublkd_cq_ready(struct io_uring *ring);

int ublkd_prep_nop(struct io_uring *ring, uint64_t user_data);
int ublkd_prep_read(struct io_uring *ring, int fd, uint64_t addr, unsigned len,
                    uint64_t offset, uint64_t user_data);
int ublkd_prep_write(struct io_uring *ring, int fd, uint64_t addr, unsigned len,
                     uint64_t offset, uint64_t user_data);
int ublkd_prep_fsync(struct io_uring *ring, int fd, unsigned flags,
                     uint64_t user_data);
int ublkd_prep_fallocate(struct io_uring *ring, int fd, int mode,
                         uint64_t offset, uint64_t len, uint64_t user_data);
int ublkd_prep_uring_cmd(struct io_uring *ring, int fd, uint32_t cmd_op,
                         const char *payload, unsigned size,
                         uint64_t user_data);

int io_uring_submit(struct io_uring *ring);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int ublkd_submit_and_wait_timeout(struct io_uring *ring, unsigned wait_nr,
                                  int64_t timeout_ns);
unsigned ublkd_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res,
                    unsigned max);
int ublkd_register_files(struct io_uring *ring, const int *fds, unsigned n);
int ublkd_register_buffers_sparse(struct io_uring *ring, unsigned n);

#define UBLKD_BACKEND_IO ...
#define UBLKD_KIND_PYTHON ...
#define UBLKD_KIND_FILE ...
#define UBLKD_KIND_NULL ...

struct ublkd_queue {
	struct io_uring *ring;
	const uint8_t *descs;
	uint64_t buf_base;
	uint32_t buf_size;
	uint32_t commit_op;
	uint32_t get_data_op;
	int pool;
	int auto_buf_reg;
	int char_fd;
	int char_fixed;
	int backend_kind;
	int backend_fd;
	int backend_fixed;
	int backend_inline;
	int backend_raw_fd;
	int backend_punch_hole;
	int backend_zero_range;
	uint16_t q_id;
	uint16_t depth;
	uint64_t *started;
	unsigned busy;
	int handover;
	int32_t *slot;
	int32_t *free_slots;
	unsigned nfree;
	int32_t *released;
	unsigned nreleased;
	uint64_t *ev_ud;
	int32_t *ev_res;
	unsigned ev_max;
	unsigned ev_n;
	uint64_t nr_io;
	uint64_t nr_python;
	uint64_t nr_waits;
	uint64_t nr_get_data;
	int nbd_stopping;
	uint64_t nbd_lost_ns;
	unsigned nbd_held;
	int nbd_failing;
	...;
};

void ublkd_queue_init_slots(struct ublkd_queue *q);
int ublkd_queue_serve(struct ublkd_queue *q, int64_t wait_ns, int64_t budget_ns);
int ublkd_queue_commit(struct ublkd_queue *q, uint16_t tag, int32_t result);
int ublkd_queue_fetch(struct ublkd_queue *q, uint32_t fetch_op, uint16_t tag);
uint64_t ublkd_queue_buffer(struct ublkd_queue *q, uint16_t tag);
uint64_t ublkd_queue_oldest(struct ublkd_queue *q);
uint64_t ublkd_now_ns(void);

struct ublkd_nbd_export {
	int64_t size;
	int64_t block_minimum;
	int64_t block_preferred;
	int64_t block_maximum;
	int read_only;
	int can_flush;
	int can_fua;
	int can_trim;
	int can_zero;
	int can_multi_conn;
};

int ublkd_nbd_load(char *error, unsigned error_size);
int ublkd_nbd_attach(struct ublkd_queue *q, const char *uri, const char *name,
                     int64_t reconnect_timeout_ns, int *error_number, char *error,
                     unsigned error_size);
void ublkd_nbd_detach(struct ublkd_queue *q);
int ublkd_nbd_probe(const char *uri, const char *name, struct ublkd_nbd_export *export,
                    int *error_number, char *error, unsigned error_size);
"""




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
    builder.set_source("ublkd.kernel._uring", '#include "ublkd_uring.h"\n#include "ublkd_nbd.h"',
                       sources=[os.path.relpath(source) for source in C_SOURCES],
                       include_dirs=[str(HERE)],
                       libraries=["uring"], extra_compile_args=list(C_WARNINGS))
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(Path(__file__).resolve().parents[2]), verbose=True)
