"""Build recipe of ``ublkd.kernel._uring``, the C side of ``uring.py``.

cffi out-of-line API mode: in liburing 2.3 (Debian 12) ``io_uring_get_sqe``
and every ``io_uring_prep_*`` are static inline, so they only exist once
compiled.  The small C functions below are compiled against liburing.h and
are all Python ever calls: each fills one whole SQE per call (no Python
struct handling on the per-I/O path), and ``ublkd_reap`` copies every ready
CQE into two arrays and advances the CQ in a single call.

setup.py names this file in ``cffi_modules``; ``python
ublkd/kernel/_uring_build.py`` builds the module in place by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HEADER = "liburing.h"
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
int ublkd_prep_ublk_io(struct io_uring *ring, int fd, uint32_t cmd_op,
                       uint16_t q_id, uint16_t tag, int32_t result,
                       uint64_t addr, uint64_t user_data);

int io_uring_submit(struct io_uring *ring);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int ublkd_submit_and_wait_timeout(struct io_uring *ring, unsigned wait_nr,
                                  int64_t timeout_ns);
unsigned ublkd_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res,
                    unsigned max);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <liburing.h>

/* Command area of a uring_cmd SQE: from byte 48 to the end of the entry. */
#define UBLKD_CMD_AREA_64 16
#define UBLKD_CMD_AREA_128 80

/* The 16-byte struct ublksrv_io_cmd, spelled out so that the build does not
 * depend on which <linux/ublk_cmd.h> the host has. */
struct ublkd_io_cmd {
	uint16_t q_id;
	uint16_t tag;
	int32_t result;
	uint64_t addr;
};

struct io_uring *ublkd_ring_new(unsigned entries, unsigned flags, int *err)
{
	struct io_uring *ring = calloc(1, sizeof(*ring));
	int ret;

	if (!ring) {
		*err = -ENOMEM;
		return NULL;
	}
	ret = io_uring_queue_init(entries, ring, flags);
	if (ret < 0) {
		free(ring);
		*err = ret;
		return NULL;
	}
	*err = 0;
	return ring;
}

void ublkd_ring_free(struct io_uring *ring)
{
	io_uring_queue_exit(ring);
	free(ring);
}

int ublkd_ring_fd(struct io_uring *ring) { return ring->ring_fd; }
unsigned ublkd_ring_flags(struct io_uring *ring) { return ring->flags; }
unsigned ublkd_sq_entries(struct io_uring *ring) { return ring->sq.ring_entries; }
unsigned ublkd_cq_entries(struct io_uring *ring) { return ring->cq.ring_entries; }
unsigned ublkd_sq_space(struct io_uring *ring) { return io_uring_sq_space_left(ring); }
unsigned ublkd_cq_ready(struct io_uring *ring) { return io_uring_cq_ready(ring); }

/* A free SQE; when the SQ is full, what is queued goes to the kernel first
 * (without SQPOLL the kernel consumes it during the call, so the retry
 * finds room).  NULL with *err set if even that fails. */
static struct io_uring_sqe *ublkd_sqe(struct io_uring *ring, int *err)
{
	struct io_uring_sqe *sqe;
	int ret;

	if (!ring) {	/* closed: Ring.close() leaves NULL behind */
		*err = -EBADFD;
		return NULL;
	}
	sqe = io_uring_get_sqe(ring);
	if (sqe)
		return sqe;
	ret = io_uring_submit(ring);
	if (ret < 0) {
		*err = ret;
		return NULL;
	}
	sqe = io_uring_get_sqe(ring);
	if (!sqe)
		*err = -EBUSY;
	return sqe;
}

int ublkd_prep_nop(struct io_uring *ring, uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ublkd_prep_read(struct io_uring *ring, int fd, uint64_t addr, unsigned len,
		    uint64_t offset, uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_read(sqe, fd, (void *)(uintptr_t)addr, len, offset);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ublkd_prep_write(struct io_uring *ring, int fd, uint64_t addr, unsigned len,
		     uint64_t offset, uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_write(sqe, fd, (const void *)(uintptr_t)addr, len, offset);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ublkd_prep_fsync(struct io_uring *ring, int fd, unsigned flags,
		     uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_fsync(sqe, fd, flags);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ublkd_prep_fallocate(struct io_uring *ring, int fd, int mode,
			 uint64_t offset, uint64_t len, uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_fallocate(sqe, fd, mode, (off_t)offset, (off_t)len);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

/* IORING_OP_URING_CMD with a cleared command area: liburing 2.3 has no
 * prep helper for it.  Returns the area so the caller can fill it. */
static uint8_t *ublkd_prep_cmd(struct io_uring *ring, struct io_uring_sqe *sqe,
			       int fd, uint32_t cmd_op, uint64_t user_data)
{
	io_uring_prep_rw(IORING_OP_URING_CMD, sqe, fd, NULL, 0, 0);
	sqe->cmd_op = cmd_op;
	io_uring_sqe_set_data64(sqe, user_data);
	if (ring->flags & IORING_SETUP_SQE128)
		memset(sqe->cmd, 0, UBLKD_CMD_AREA_128);
	return sqe->cmd;
}

int ublkd_prep_uring_cmd(struct io_uring *ring, int fd, uint32_t cmd_op,
			 const char *payload, unsigned size, uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe;

	/* Checked before taking an SQE, which cannot be given back. */
	if (ring && size > ((ring->flags & IORING_SETUP_SQE128) ?
			    UBLKD_CMD_AREA_128 : UBLKD_CMD_AREA_64))
		return -EMSGSIZE;
	sqe = ublkd_sqe(ring, &err);
	if (!sqe)
		return err;
	memcpy(ublkd_prep_cmd(ring, sqe, fd, cmd_op, user_data), payload, size);
	return 0;
}

int ublkd_prep_ublk_io(struct io_uring *ring, int fd, uint32_t cmd_op,
		       uint16_t q_id, uint16_t tag, int32_t result,
		       uint64_t addr, uint64_t user_data)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(ring, &err);
	struct ublkd_io_cmd *cmd;

	if (!sqe)
		return err;
	cmd = (struct ublkd_io_cmd *)ublkd_prep_cmd(ring, sqe, fd, cmd_op, user_data);
	cmd->q_id = q_id;
	cmd->tag = tag;
	cmd->result = result;
	cmd->addr = addr;
	return 0;
}

/* Submit, then wait up to timeout_ns for wait_nr completions (-ETIME if
 * they did not come); a negative timeout waits without limit. */
int ublkd_submit_and_wait_timeout(struct io_uring *ring, unsigned wait_nr,
				  int64_t timeout_ns)
{
	struct __kernel_timespec ts;
	struct io_uring_cqe *cqe = NULL;

	if (timeout_ns < 0)
		return io_uring_submit_and_wait(ring, wait_nr);
	ts.tv_sec = timeout_ns / 1000000000;
	ts.tv_nsec = timeout_ns % 1000000000;
	return io_uring_submit_and_wait_timeout(ring, &cqe, wait_nr, &ts, NULL);
}

/* Copy up to max ready CQEs out and mark them seen, all in one call. */
unsigned ublkd_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res,
		    unsigned max)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;

	io_uring_for_each_cqe(ring, head, cqe) {
		if (n == max)
			break;
		user_data[n] = cqe->user_data;
		res[n] = cqe->res;
		n++;
	}
	io_uring_cq_advance(ring, n);
	return n;
}
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
    builder.set_source("ublkd.kernel._uring", SOURCE, libraries=["uring"])
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(Path(__file__).resolve().parents[2]), verbose=True)
