/* ublkd's C side of ublkd/kernel/uring.py: the io_uring helpers and the
 * per-queue serving loop (ublkd_uring.c).  What Python calls is declared
 * between the "cffi begin" and "cffi end" comments: _uring_build.py hands
 * that part to cffi's cdef, so it is declared once, here. */
#ifndef UBLKD_URING_H
#define UBLKD_URING_H

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <liburing.h>

/* cffi begin */
#define UBLKD_BACKEND_IO (1ULL << 32)
#define UBLKD_TAG_MASK 0xffffULL
#define UBLKD_KIND_PYTHON 0
#define UBLKD_KIND_FILE 1
#define UBLKD_KIND_NULL 2
#define UBLKD_KIND_NBD 3
#define UBLKD_KIND_RBD 4
/* user_data of a poll on the NBD socket (ublkd_nbd.c): bit 0 POLLOUT, bits
 * 16-31 the connection's generation. */
#define UBLKD_NBD_POLL (1ULL << 33)
/* user_data of the read of an rbd queue's eventfd (ublkd_rbd.c) */
#define UBLKD_RBD_WAKE (1ULL << 34)

#define UBLKD_IO_RES_OK 0
#define UBLKD_IO_RES_NEED_GET_DATA 1
#define UBLKD_OP_READ 0
#define UBLKD_OP_WRITE 1
#define UBLKD_OP_FLUSH 2
#define UBLKD_OP_DISCARD 3
#define UBLKD_OP_WRITE_ZEROES 5
#define UBLKD_IO_F_FUA (1U << 13)
#define UBLKD_IO_F_NOUNMAP (1U << 15)

struct ublkd_io_desc {
	uint32_t op_flags;
	uint32_t nr_sectors;
	uint64_t start_sector;
	uint64_t addr;
};

struct nbd_handle;
struct ublkd_nbd_request;
struct ublkd_rbd_image;
struct ublkd_rbd_queue;

struct ublkd_queue {
	struct io_uring *ring;
	const uint8_t *descs;	/* the mmap'd struct ublksrv_io_desc array */
	uint64_t buf_base;	/* buffer i: buf_base + i * buf_size, i < depth */
	uint32_t buf_size;
	uint32_t commit_op;	/* COMMIT_AND_FETCH_REQ, legacy or ioctl form */
	uint32_t get_data_op;	/* NEED_GET_DATA, same form */
	int pool;		/* NEED_GET_DATA device: buffers from the pool */
	int auto_buf_reg;	/* UBLK_F_AUTO_BUF_REG device: no buffers of ours;
				 * the kernel registers each request's pages as
				 * the ring's fixed buffer number tag (zero copy) */
	int user_copy;		/* UBLK_F_USER_COPY device: no buffers of ours;
				 * READ/WRITE data moves by pwrite/pread on
				 * /dev/ublkcN straight from/to backend_map */
	int char_fd;		/* /dev/ublkcN: fd, or fixed-file index */
	int char_fixed;
	int char_raw_fd;	/* /dev/ublkcN's plain fd, for user copy */
	int backend_kind;	/* UBLKD_KIND_* */
	int backend_fd;		/* file backend: fd, or fixed-file index */
	int backend_fixed;
	int backend_inline;	/* pread/pwrite here instead of io_uring */
	int backend_raw_fd;	/* the plain fd, for inline I/O */
	uint8_t *backend_map;	/* user copy: the backing file, mmap'd shared */
	uint64_t backend_map_len;
	int backend_punch_hole;	/* DISCARD by FALLOC_FL_PUNCH_HOLE, else nothing */
	int backend_zero_range;	/* WRITE_ZEROES by FALLOC_FL_ZERO_RANGE, else Python */
	uint16_t q_id;
	uint16_t depth;
	uint64_t *started;	/* per tag: CLOCK_MONOTONIC ns the request came in, 0 = idle */
	unsigned busy;		/* tags with a request in the server (started != 0) */
	int handover;		/* leave new requests fetched, return once busy == 0 */
	int32_t *slot;		/* per tag: its buffer, -1 none (pool mode) */
	int32_t *free_slots;	/* pool: stack of free buffers */
	unsigned nfree;
	int32_t *released;	/* pool: committed, free after the next submit */
	unsigned nreleased;
	uint64_t *ev_ud;	/* events for Python */
	int32_t *ev_res;
	unsigned ev_max;
	unsigned ev_n;
	uint64_t nr_io;		/* requests answered without Python */
	uint64_t nr_python;	/* events handed to Python */
	uint64_t nr_waits;	/* sleeps in io_uring_enter */
	uint64_t nr_get_data;	/* NEED_GET_DATA round trips */
	uint64_t nr_polled;	/* completions found by polling, not by a wait */
	/* poll_us (docs/performance.md, "Polling"): after a completion, look
	 * for the next one for poll_ns before sleeping in io_uring_enter */
	int64_t poll_ns;
	uint64_t poll_until;	/* CLOCK_MONOTONIC ns the polling ends */
	/* nbd backend (ublkd_nbd.c): this queue's own connection */
	struct nbd_handle *nbd;
	int nbd_fd;
	unsigned nbd_polling;	/* polls armed: 1 POLLIN, 2 POLLOUT */
	int nbd_can_fua;
	int nbd_error;		/* a commit that failed inside a libnbd callback */
	struct ublkd_nbd_request *nbd_requests;	/* per tag */
	char *nbd_uri;
	char *nbd_name;
	int nbd_connecting;	/* nbd is a connection being made */
	uint16_t nbd_gen;	/* which connection a poll's CQE belongs to */
	uint64_t nbd_lost_ns;	/* when the connection went; 0 while connected */
	uint64_t nbd_retry_ns;	/* next attempt to reconnect */
	uint64_t nbd_backoff_ns;
	uint64_t nbd_timeout_ns;	/* reconnect_timeout; 0: wait forever */
	int nbd_failing;	/* past the timeout: requests fail until reconnected */
	int nbd_stopping;	/* set by Python before STOP_DEV: fail what waits */
	unsigned nbd_held;	/* requests waiting for a connection */
	uint16_t *nbd_failed;	/* tags whose command failed in the last libnbd call */
	unsigned nbd_nfailed;
	uint64_t nbd_reconnects;
	int64_t nbd_wait_ns;	/* while disconnected: wake the loop this often */
	/* rbd backend (ublkd_rbd.c): requests in librbd, their completions */
	struct ublkd_rbd_queue *rbd;
};

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
int ublkd_submit_and_wait_timeout(struct io_uring *ring, unsigned wait_nr,
                                  int64_t timeout_ns);
unsigned ublkd_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res,
                    unsigned max);
int ublkd_register_files(struct io_uring *ring, const int *fds, unsigned n);
int ublkd_update_files(struct io_uring *ring, unsigned off, const int *fds, unsigned n);
int ublkd_unregister_files(struct io_uring *ring);
int ublkd_register_buffers_sparse(struct io_uring *ring, unsigned n);
void ublkd_queue_init_slots(struct ublkd_queue *q);
int ublkd_queue_serve(struct ublkd_queue *q, int64_t wait_ns, int64_t budget_ns);
int ublkd_queue_commit(struct ublkd_queue *q, uint16_t tag, int32_t result);
int ublkd_queue_fetch(struct ublkd_queue *q, uint32_t fetch_op, uint16_t tag);
uint64_t ublkd_queue_buffer(struct ublkd_queue *q, uint16_t tag);
uint64_t ublkd_queue_oldest(struct ublkd_queue *q);
uint64_t ublkd_now_ns(void);
/* ublkd_nbd.c */
int ublkd_nbd_attach(struct ublkd_queue *q, const char *uri, const char *name,
		     int64_t reconnect_timeout_ns, int *error_number, char *error,
		     unsigned error_size);
void ublkd_nbd_detach(struct ublkd_queue *q);
/* ublkd_rbd.c */
int ublkd_rbd_attach(struct ublkd_queue *q, struct ublkd_rbd_image *image);
void ublkd_rbd_detach(struct ublkd_queue *q);
/* cffi end */

/* C only */
struct io_uring_sqe *ublkd_sqe(struct io_uring *ring, int *err);
int ublkd_nbd_tick(struct ublkd_queue *q, uint64_t now);
int ublkd_nbd_io(struct ublkd_queue *q, unsigned tag, const struct ublkd_io_desc *d, void *buf);
int ublkd_nbd_polled(struct ublkd_queue *q, uint64_t user_data, int32_t res);
int ublkd_rbd_io(struct ublkd_queue *q, unsigned tag, const struct ublkd_io_desc *d, void *buf);
int ublkd_rbd_woken(struct ublkd_queue *q);

#endif
