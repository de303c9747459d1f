/* The io_uring helpers and the per-queue serving loop; see ublkd_uring.h. */
#include "ublkd_uring.h"
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
struct io_uring_sqe *ublkd_sqe(struct io_uring *ring, int *err)
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
int ublkd_register_files(struct io_uring *ring, const int *fds, unsigned n)
{
	if (!ring)
		return -EBADFD;
	return io_uring_register_files(ring, fds, n);
}

/* Fixed files off .. off+n-1 become fds (a slot registered as -1 is empty). */
int ublkd_update_files(struct io_uring *ring, unsigned off, const int *fds, unsigned n)
{
	int ret;

	if (!ring)
		return -EBADFD;
	ret = io_uring_register_files_update(ring, off, fds, n);
	return ret < 0 ? ret : 0;
}

/* Drop every fixed file now, in this thread: the files' last references go
 * at once instead of with the ring's deferred teardown (io_uring.c's exit
 * work, after the ring fd's close).  Only with nothing in flight. */
int ublkd_unregister_files(struct io_uring *ring)
{
	if (!ring)
		return -EBADFD;
	return io_uring_unregister_files(ring);
}

/* An empty table of n fixed buffers, for the kernel to fill (AUTO_BUF_REG). */
int ublkd_register_buffers_sparse(struct io_uring *ring, unsigned n)
{
	if (!ring)
		return -EBADFD;
	return io_uring_register_buffers_sparse(ring, n);
}

/* ---- The serving loop of one ublk queue -------------------------------
 *
 * Everything a request needs on its common path happens here, with the
 * GIL released (cffi drops it around every call): reap the CQEs, decode
 * the descriptor of each fetched tag, start the backend's I/O (or answer
 * at once), and queue COMMIT_AND_FETCH for every finished one; the next
 * io_uring_enter submits the whole batch and waits for the next.  Python
 * sees only "events": ublk completions it must handle itself (ABORT,
 * errors, requests of a backend or an op this loop does not know).
 * docs/performance.md has the numbers that put this loop in C.
 *
 * Buffers.  Without NEED_GET_DATA the kernel copies a WRITE's data into
 * the address given with the tag's previous COMMIT_AND_FETCH, before we
 * know the size: every tag needs its own buffer of the largest request,
 * and resident memory grows to depth x the largest request seen.  With
 * UBLK_F_NEED_GET_DATA ("pool" mode) a WRITE first comes back as
 * NEED_GET_DATA and we name the buffer then, and a READ's buffer is named
 * by its COMMIT: buffers come from a LIFO pool when a request needs one
 * and go back once the kernel has copied out of them, so only about as
 * many as there are requests in flight are ever touched.
 *
 * With UBLK_F_AUTO_BUF_REG (6.16+, "zero copy") there are no buffers of
 * ours at all: each FETCH/COMMIT_AND_FETCH names, in its SQE's addr, the
 * ring's fixed-buffer slot (the tag) where the kernel registers the next
 * request's own pages; READ_FIXED/WRITE_FIXED on the backing file then
 * move the data straight between the file and the request, and the
 * COMMIT on this ring unregisters it.  NEED_GET_DATA does not apply.
 */

/* UBLK_F_USER_COPY: where on /dev/ublkcN a request's data is read and
 * written (ublk_cmd.h: UBLKSRV_IO_BUF_OFFSET, UBLK_TAG_OFF, UBLK_QID_OFF). */
#define UBLKD_USER_COPY_BASE 0x80000000ULL
#define UBLKD_USER_COPY_TAG_OFF 25
#define UBLKD_USER_COPY_QID_OFF (UBLKD_USER_COPY_TAG_OFF + 16)

#define UBLKD_FALLOC_KEEP_SIZE 0x01
#define UBLKD_FALLOC_PUNCH_HOLE 0x02
#define UBLKD_FALLOC_ZERO_RANGE 0x10




uint64_t ublkd_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Per-tag state; the pool is set up by Python (slot[] = -1 or the tag). */
void ublkd_queue_init_slots(struct ublkd_queue *q)
{
	unsigned i;

	q->nfree = q->nreleased = 0;
	for (i = 0; i < q->depth; i++) {
		q->slot[i] = (q->pool || q->auto_buf_reg || q->user_copy) ? -1 : (int32_t)i;
		if (q->pool)	/* LIFO: buffer 0 on top, so low buffers stay hot */
			q->free_slots[q->nfree++] = q->depth - 1 - i;
	}
}

static inline void ublkd_set_started(struct ublkd_queue *q, unsigned tag, uint64_t t)
{
	if (!q->started[tag] != !t)
		q->busy += t ? 1 : -1;
	__atomic_store_n(&q->started[tag], t, __ATOMIC_RELAXED);
}

static void ublkd_free_released(struct ublkd_queue *q)
{
	while (q->nreleased)
		q->free_slots[q->nfree++] = q->released[--q->nreleased];
}

/* The buffer of tag, taken from the pool if it has none yet; 0 if none
 * can be had (cannot happen: there are as many buffers as tags). */
static uint64_t ublkd_take_buffer(struct ublkd_queue *q, unsigned tag)
{
	if (q->slot[tag] < 0) {
		if (!q->nfree && q->nreleased) {
			/* Their COMMITs are queued: once submitted, the kernel
			 * has copied out of them (it does so while handling the
			 * command, in this thread). */
			if (io_uring_submit(q->ring) < 0)
				return 0;
			ublkd_free_released(q);
		}
		if (!q->nfree)
			return 0;
		q->slot[tag] = q->free_slots[--q->nfree];
	}
	return q->buf_base + (uint64_t)q->slot[tag] * q->buf_size;
}

/* The address of tag's buffer, 0 if it has none. */
uint64_t ublkd_queue_buffer(struct ublkd_queue *q, uint16_t tag)
{
	if (q->slot[tag] < 0)
		return 0;
	return q->buf_base + (uint64_t)q->slot[tag] * q->buf_size;
}

static int ublkd_prep_io_cmd(struct ublkd_queue *q, uint32_t op, uint16_t tag,
			     int32_t result, uint64_t addr)
{
	int err = 0;
	struct io_uring_sqe *sqe = ublkd_sqe(q->ring, &err);
	struct ublkd_io_cmd *cmd;

	if (!sqe)
		return err;
	cmd = (struct ublkd_io_cmd *)ublkd_prep_cmd(q->ring, sqe, q->char_fd, op, tag);
	if (q->char_fixed)
		sqe->flags |= IOSQE_FIXED_FILE;
	cmd->q_id = q->q_id;
	cmd->tag = tag;
	cmd->result = result;
	cmd->addr = addr;
	if (q->auto_buf_reg)	/* struct ublk_auto_buf_reg: index = tag, no flags */
		sqe->addr = tag;
	return 0;
}

/* FETCH_REQ of tag: its own buffer, none (pool mode: named later), or the
 * fixed-buffer slot the kernel registers the request in (auto_buf_reg). */
int ublkd_queue_fetch(struct ublkd_queue *q, uint32_t fetch_op, uint16_t tag)
{
	return ublkd_prep_io_cmd(q, fetch_op, tag, 0, ublkd_queue_buffer(q, tag));
}

int ublkd_queue_commit(struct ublkd_queue *q, uint16_t tag, int32_t result)
{
	uint64_t addr = ublkd_queue_buffer(q, tag);
	int ret;

	/* A READ's COMMIT must name a buffer even when it failed (the kernel
	 * copies nothing then): the tag's own range, never used in pool mode. */
	if (!addr && q->pool && result < 0)
		addr = q->buf_base + (uint64_t)tag * q->buf_size;
	ret = ublkd_prep_io_cmd(q, q->commit_op, tag, result, addr);
	if (ret)
		return ret;
	if (q->pool && q->slot[tag] >= 0) {
		q->released[q->nreleased++] = q->slot[tag];
		q->slot[tag] = -1;
	}
	ublkd_set_started(q, tag, 0);
	return 0;
}

static void ublkd_event(struct ublkd_queue *q, uint64_t user_data, int32_t res)
{
	q->ev_ud[q->ev_n] = user_data;
	q->ev_res[q->ev_n] = res;
	q->ev_n++;
	q->nr_python++;
}

/* pread (write = 0) or pwrite of len bytes at pos, short transfers and EINTR
 * retried: the bytes moved (fewer only at end of file), or -errno when
 * nothing could be moved. */
static int ublkd_full_io(int fd, int write, void *buf, size_t len, off_t pos)
{
	size_t done = 0;
	ssize_t n;

	while (done < len) {
		if (write)
			n = pwrite(fd, (char *)buf + done, len - done, pos + (off_t)done);
		else
			n = pread(fd, (char *)buf + done, len - done, pos + (off_t)done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return done ? (int)done : -errno;
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (int)done;
}

/* UBLK_F_USER_COPY: one copy, by the kernel, between the request's pages and
 * the mapped backing file's (a READ writes the file's bytes to /dev/ublkcN
 * at the request's position, a WRITE reads the request's into the file).
 * The mapping is only ever touched inside these calls: a page gone from a
 * shrunk file makes the call fail (EFAULT), never a SIGBUS here. */
static int ublkd_user_copy_io(struct ublkd_queue *q, unsigned tag, unsigned op,
			      uint64_t len, uint64_t offset)
{
	/* A sum, not an OR: tags from 64 up reach into the base's bit. */
	uint64_t pos = UBLKD_USER_COPY_BASE +
		       ((uint64_t)q->q_id << UBLKD_USER_COPY_QID_OFF) +
		       ((uint64_t)tag << UBLKD_USER_COPY_TAG_OFF);
	int ret;

	if (offset > q->backend_map_len || len > q->backend_map_len - offset)
		return -EIO;
	/* A READ writes the file's bytes to the request, a WRITE reads them. */
	ret = ublkd_full_io(q->char_raw_fd, op == UBLKD_OP_READ, q->backend_map + offset,
			    len, (off_t)pos);
	if (ret < 0 && ret != -EFAULT)
		return ret;
	return ret == (int)len ? ret : -EIO;	/* EFAULT, short: the file shrank */
}

/* The file backend: 1 when an SQE tagged tag|BACKEND_IO was queued, 0 when
 * the answer is in *res already, -1 when Python must handle the op, -2
 * (with *err) when no SQE could be had. */
static int ublkd_file_io(struct ublkd_queue *q, unsigned tag,
			 const struct ublkd_io_desc *d, void *buf, int *res, int *err)
{
	unsigned op = d->op_flags & 0xff;
	uint64_t offset = d->start_sector << 9;
	uint64_t len = (uint64_t)d->nr_sectors << 9;
	struct io_uring_sqe *sqe;

	if (op == UBLKD_OP_READ || op == UBLKD_OP_WRITE) {
		if (q->user_copy) {
			*res = ublkd_user_copy_io(q, tag, op, len, offset);
			return 0;
		}
		if (q->backend_inline && !q->auto_buf_reg) {
			*res = ublkd_full_io(q->backend_raw_fd, op == UBLKD_OP_WRITE, buf, len,
					     (off_t)offset);
			return 0;
		}
	} else if (op == UBLKD_OP_DISCARD && !q->backend_punch_hole) {
		*res = 0;	/* a hint: doing nothing is a valid answer */
		return 0;
	} else if (op == UBLKD_OP_WRITE_ZEROES && !q->backend_zero_range) {
		return -1;	/* Python writes the zeros */
	} else if (op != UBLKD_OP_FLUSH && op != UBLKD_OP_DISCARD &&
		   op != UBLKD_OP_WRITE_ZEROES) {
		return -1;
	}
	sqe = ublkd_sqe(q->ring, err);
	if (!sqe)
		return -2;
	switch (op) {
	case UBLKD_OP_READ:
		if (q->auto_buf_reg)	/* addr: an offset into the request, 0 */
			io_uring_prep_read_fixed(sqe, q->backend_fd, NULL, len, offset, tag);
		else
			io_uring_prep_read(sqe, q->backend_fd, buf, len, offset);
		break;
	case UBLKD_OP_WRITE:
		if (q->auto_buf_reg)
			io_uring_prep_write_fixed(sqe, q->backend_fd, NULL, len, offset, tag);
		else
			io_uring_prep_write(sqe, q->backend_fd, buf, len, offset);
		break;
	case UBLKD_OP_FLUSH:
		io_uring_prep_fsync(sqe, q->backend_fd, IORING_FSYNC_DATASYNC);
		break;
	case UBLKD_OP_DISCARD:
		io_uring_prep_fallocate(sqe, q->backend_fd,
					UBLKD_FALLOC_PUNCH_HOLE | UBLKD_FALLOC_KEEP_SIZE,
					(off_t)offset, (off_t)len);
		break;
	default: /* WRITE_ZEROES */
		io_uring_prep_fallocate(sqe, q->backend_fd,
					UBLKD_FALLOC_ZERO_RANGE | UBLKD_FALLOC_KEEP_SIZE,
					(off_t)offset, (off_t)len);
		break;
	}
	if (q->backend_fixed)
		sqe->flags |= IOSQE_FIXED_FILE;
	io_uring_sqe_set_data64(sqe, UBLKD_BACKEND_IO | tag);
	return 1;
}

/* A fetched request on tag (its data, for a WRITE, in its buffer): start
 * it, answer it, or hand it to Python. */
static int ublkd_dispatch(struct ublkd_queue *q, unsigned tag, uint64_t now)
{
	const struct ublkd_io_desc *d =
		(const struct ublkd_io_desc *)(q->descs + (size_t)tag * sizeof(*d));
	unsigned op = d->op_flags & 0xff;
	uint64_t len = (uint64_t)d->nr_sectors << 9;
	int res = 0, err = 0, ret;
	void *buf = NULL;

	ublkd_set_started(q, tag, now);
	if (q->auto_buf_reg) {
		/* The request's pages are the ring's buffer number tag: only
		 * the file backend's fixed reads and writes can use them. */
		if (q->backend_kind != UBLKD_KIND_FILE)
			return ublkd_queue_commit(q, tag, -EIO);
	} else if (q->user_copy) {
		/* The data moves on /dev/ublkcN: only the mapped file backend. */
		if (q->backend_kind != UBLKD_KIND_FILE || !q->backend_map)
			return ublkd_queue_commit(q, tag, -EIO);
	} else if (op == UBLKD_OP_READ || op == UBLKD_OP_WRITE) {
		uint64_t addr;

		if (q->pool && op == UBLKD_OP_WRITE && q->slot[tag] < 0)
			return ublkd_queue_commit(q, tag, -EIO);	/* no NEED_GET_DATA came */
		addr = ublkd_take_buffer(q, tag);

		if (!addr)
			return ublkd_queue_commit(q, tag, -ENOMEM);
		if (len > q->buf_size)
			return ublkd_queue_commit(q, tag, -EINVAL);
		buf = (void *)(uintptr_t)addr;
	}
	switch (q->backend_kind) {
	case UBLKD_KIND_FILE:
		ret = ublkd_file_io(q, tag, d, buf, &res, &err);
		if (ret == 1)
			return 0;	/* in flight; its CQE commits */
		if (ret == -2)
			return err;
		if (ret == -1)
			break;
		q->nr_io++;
		return ublkd_queue_commit(q, tag, res);
	case UBLKD_KIND_NBD:
		ret = ublkd_nbd_io(q, tag, d, buf);
		if (ret == -ENOSYS)
			break;
		return ret;
	case UBLKD_KIND_RBD:
		ret = ublkd_rbd_io(q, tag, d, buf);
		if (ret == -ENOSYS)
			break;
		return ret;
	case UBLKD_KIND_NULL:
		if (op == UBLKD_OP_READ) {	/* the buffer may hold an old write */
			memset(buf, 0, len);
			res = (int)len;
		} else if (op == UBLKD_OP_WRITE) {
			res = (int)len;
		} else if (op != UBLKD_OP_FLUSH && op != UBLKD_OP_DISCARD &&
			   op != UBLKD_OP_WRITE_ZEROES) {
			break;
		}
		q->nr_io++;
		return ublkd_queue_commit(q, tag, res);
	}
	ublkd_event(q, tag, UBLKD_IO_RES_OK);	/* Python's backend decides */
	return 0;
}

/* NEED_GET_DATA: a WRITE came in; name the buffer its data goes to. */
static int ublkd_get_data(struct ublkd_queue *q, unsigned tag)
{
	uint64_t addr = ublkd_take_buffer(q, tag);

	if (!addr)
		return -ENOMEM;
	q->nr_get_data++;
	return ublkd_prep_io_cmd(q, q->get_data_op, tag, 0, addr);
}

/* Handle the ready CQEs, as many as the event array has room for. */
static int ublkd_queue_handle(struct ublkd_queue *q, uint64_t now)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;
	int ret = 0;

	io_uring_for_each_cqe(q->ring, head, cqe) {
		uint64_t ud = cqe->user_data;
		unsigned tag = ud & UBLKD_TAG_MASK;

		if (q->ev_n >= q->ev_max)
			break;
		n++;
		if (ud & UBLKD_NBD_POLL) {
			ret = ublkd_nbd_polled(q, ud, cqe->res);
		} else if (ud & UBLKD_RBD_WAKE) {
			ret = ublkd_rbd_woken(q);
		} else if (ud & UBLKD_BACKEND_IO) {
			q->nr_io++;
			ret = ublkd_queue_commit(q, tag, cqe->res);
		} else if (tag >= q->depth) {
			ublkd_event(q, ud, cqe->res);
		} else if (__atomic_load_n(&q->handover, __ATOMIC_RELAXED) &&
			   (cqe->res == UBLKD_IO_RES_OK ||
			    (cqe->res == UBLKD_IO_RES_NEED_GET_DATA && q->slot[tag] < 0))) {
			/* Handing over: the request stays fetched, unanswered;
			 * the kernel re-issues it to the next server. */
		} else if (cqe->res == UBLKD_IO_RES_OK) {
			ret = ublkd_dispatch(q, tag, now);
		} else if (cqe->res == UBLKD_IO_RES_NEED_GET_DATA && q->pool) {
			ret = ublkd_get_data(q, tag);
		} else {	/* ABORT, errors */
			ublkd_event(q, ud, cqe->res);
		}
		if (ret < 0)
			break;
	}
	io_uring_cq_advance(q->ring, n);
	return ret;
}

/* ---- Polling instead of sleeping (poll_us) ----------------------------
 *
 * A request at iodepth 1 crosses this thread twice: the kernel hands it
 * over, the backend answers it.  Each time a sleeping thread must be woken
 * and scheduled, which in the guest costs about as much as the backend's
 * own work (docs/performance.md, "A third look at NBD").  With poll_ns set,
 * the thread keeps looking for the next completion for that long after
 * the last one, and sleeps only once nothing came: a vCPU per queue while
 * I/O flows, nothing on an idle device.
 *
 * Only while at most one request is in the server: then its latency is the
 * whole story.  With more in flight each wake-up serves several, and the
 * CPU is worth more to the server (qemu-nbd in the 2-vCPU guest, 4k
 * randread iodepth 32: 3344-4269 IOPS sleeping, 1986-1991 polling at any
 * depth, 2506-3662 with the yield below, 3558-3659 with this rule).  And
 * every 64 turns the thread yields: a server or an application waiting
 * for this CPU runs first (qemu-nbd, 4k randread iodepth 1: 651-702 IOPS
 * sleeping, 591-603 polling without yielding, 771-842 with).
 * docs/performance.md, "Polling", has the whole table.
 *
 * Looking costs no system call.  Most completions (a ublk request, a poll
 * on a socket, an eventfd read) are posted by task work that runs only
 * when this thread enters the kernel; with IORING_SETUP_TASKRUN_FLAG the
 * kernel says in the SQ ring's flags when there is some, and only then
 * we enter.  A ring without that flag enters every turn.
 */

static inline void ublkd_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#else
	__asm__ __volatile__("" ::: "memory");
#endif
}

/* Submit what is queued, then look for a completion until `until`: 1 when
 * one is ready, 0 when none came, negative errno if the ring fails. */
static int ublkd_queue_poll(struct ublkd_queue *q, uint64_t until)
{
	struct io_uring *ring = q->ring;
	unsigned enter_flags = IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW;
	unsigned turns = 0;
	int ret;

	if (!(ring->flags & IORING_SETUP_TASKRUN_FLAG))
		enter_flags = ~0U;	/* no word from the kernel: always enter */
	if (io_uring_sq_ready(ring)) {
		ret = io_uring_submit(ring);
		if (ret < 0)
			return ret;
		ublkd_free_released(q);
	}
	while (!io_uring_cq_ready(ring)) {
		if (!(++turns & 63)) {
			if (ublkd_now_ns() >= until)
				return 0;
			sched_yield();
		}
		if (IO_URING_READ_ONCE(*ring->sq.kflags) & enter_flags) {
			ret = io_uring_get_events(ring);
			if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
				return ret;
		} else {
			ublkd_cpu_relax();
		}
	}
	q->nr_polled++;
	return 1;
}

/* Nanoseconds the next sleep in io_uring_enter may last. */
static int64_t ublkd_queue_wait_left(const struct ublkd_queue *q, uint64_t now,
				     uint64_t deadline, int64_t wait_ns)
{
	int64_t left = (int64_t)(deadline - now);

	if (left > wait_ns)
		left = wait_ns;
	if (q->nbd_wait_ns && left > q->nbd_wait_ns)
		left = q->nbd_wait_ns;
	return left < 0 ? 0 : left;
}

/* Sleep in io_uring_enter until a completion comes or `left` ns pass,
 * submitting what is queued: 0, -ETIME, or negative errno if the ring fails. */
static int ublkd_queue_sleep(struct ublkd_queue *q, int64_t left)
{
	struct __kernel_timespec ts = {
		.tv_sec = left / 1000000000,
		.tv_nsec = left % 1000000000,
	};
	struct io_uring_cqe *cqe;
	int ret;

	q->nr_waits++;
	ret = io_uring_submit_and_wait_timeout(q->ring, &cqe, 1, &ts, NULL);
	if (ret == -EINTR || ret > 0)
		ret = 0;
	if (ret < 0 && ret != -ETIME)
		return ret;
	/* What was committed before this enter has been submitted by it. */
	ublkd_free_released(q);
	return ret;
}

/* Serve until Python has events to handle (returns how many), nothing came
 * for wait_ns, budget_ns passed, or a hand-over has nothing left in flight
 * (returns 0); negative errno if the ring fails.  Events are in
 * ev_ud/ev_res[0 .. return value). */
int ublkd_queue_serve(struct ublkd_queue *q, int64_t wait_ns, int64_t budget_ns)
{
	uint64_t now = ublkd_now_ns();
	uint64_t deadline = now + (uint64_t)budget_ns;
	int ret;

	if (!q->ring)
		return -EBADFD;
	q->ev_n = 0;
	for (;;) {
		/* Requests held for a lost NBD server stay unanswered: the
		 * kernel re-issues them to the next server too. */
		if (q->busy == q->nbd_held && __atomic_load_n(&q->handover, __ATOMIC_RELAXED)) {
			ret = io_uring_submit(q->ring);	/* the last commits */
			return ret < 0 ? ret : 0;
		}
		if (q->backend_kind == UBLKD_KIND_NBD) {
			ret = ublkd_nbd_tick(q, now);
			if (ret < 0)
				return ret;
		}
		ret = 0;
		if (q->poll_ns > 0 && now < q->poll_until && q->busy <= 1) {
			ret = ublkd_queue_poll(q, q->poll_until < deadline ? q->poll_until : deadline);
			if (ret == 0)
				now = ublkd_now_ns();	/* the sleep's time left counts from here */
		}
		if (ret == 0)
			ret = ublkd_queue_sleep(q, ublkd_queue_wait_left(q, now, deadline, wait_ns));
		if (ret < 0 && ret != -ETIME)
			return ret;
		now = ublkd_now_ns();
		if (io_uring_cq_ready(q->ring)) {
			int err = ublkd_queue_handle(q, now);

			if (err < 0)
				return err;
			q->poll_until = now + (uint64_t)q->poll_ns;
		} else if (ret == -ETIME) {
			return q->ev_n;	/* idle for wait_ns */
		}
		if (q->ev_n || now >= deadline)
			return q->ev_n;
	}
}

/* CLOCK_MONOTONIC ns at which the oldest request now in the server came
 * in, 0 if none.  Called from other threads: relaxed atomic loads. */
uint64_t ublkd_queue_oldest(struct ublkd_queue *q)
{
	uint64_t oldest = 0, t;
	unsigned i;

	for (i = 0; i < q->depth; i++) {
		t = __atomic_load_n(&q->started[i], __ATOMIC_RELAXED);
		if (t && (!oldest || t < oldest))
			oldest = t;
	}
	return oldest;
}
