/* libnbd at run time, and the handshake of a new device; see ublkd_nbd.h. */
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "ublkd_nbd.h"
#include "ublkd_uring.h"

#define UBLKD_LIBNBD "libnbd.so.0"

struct ublkd_nbd_api ublkd_nbd;

struct ublkd_nbd_symbol {
	const char *name;
	void **slot;
	int optional;
};

#define SYMBOL(field, optional) { "nbd_" #field, (void **)&ublkd_nbd.field, optional }

static const struct ublkd_nbd_symbol ublkd_nbd_symbols[] = {
	SYMBOL(create, 0), SYMBOL(close, 0), SYMBOL(get_error, 0), SYMBOL(get_errno, 0),
	SYMBOL(get_version, 0), SYMBOL(set_handle_name, 0), SYMBOL(set_uri_allow_tls, 0),
	SYMBOL(set_uri_allow_transports, 0), SYMBOL(supports_uri, 0), SYMBOL(connect_uri, 0),
	SYMBOL(aio_connect_uri, 0), SYMBOL(aio_is_connecting, 0), SYMBOL(aio_is_ready, 0),
	SYMBOL(get_size, 0), SYMBOL(get_block_size, 0), SYMBOL(is_read_only, 0),
	SYMBOL(can_flush, 0), SYMBOL(can_fua, 0), SYMBOL(can_trim, 0), SYMBOL(can_zero, 0),
	SYMBOL(can_multi_conn, 0), SYMBOL(aio_get_fd, 0), SYMBOL(aio_get_direction, 0),
	SYMBOL(aio_notify_read, 0), SYMBOL(aio_notify_write, 0), SYMBOL(aio_is_dead, 0),
	SYMBOL(aio_is_closed, 0), SYMBOL(aio_in_flight, 0), SYMBOL(aio_pread, 0),
	SYMBOL(aio_pwrite, 0), SYMBOL(aio_flush, 0), SYMBOL(aio_trim, 0), SYMBOL(aio_zero, 0),
	SYMBOL(set_pread_initialize, 1), SYMBOL(set_request_structured_replies, 0),
};

/* Load libnbd once; 0, or -1 with what failed in `error`.  Not thread-safe:
 * Python calls it before any queue thread exists. */
int ublkd_nbd_load(char *error, unsigned error_size)
{
	static void *library;
	void *lib;
	size_t i;

	if (library)
		return 0;
	lib = dlopen(UBLKD_LIBNBD, RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		snprintf(error, error_size, "%s", dlerror());
		return -1;
	}
	for (i = 0; i < sizeof(ublkd_nbd_symbols) / sizeof(ublkd_nbd_symbols[0]); i++) {
		const struct ublkd_nbd_symbol *symbol = &ublkd_nbd_symbols[i];

		*symbol->slot = dlsym(lib, symbol->name);
		if (!*symbol->slot && !symbol->optional) {
			snprintf(error, error_size, "%s has no %s (libnbd older than 1.4?)",
				 UBLKD_LIBNBD, symbol->name);
			dlclose(lib);
			memset(&ublkd_nbd, 0, sizeof(ublkd_nbd));
			return -1;
		}
	}
	library = lib;
	return 0;
}

static void ublkd_nbd_fail(int *error_number, char *error, unsigned error_size)
{
	const char *message = ublkd_nbd.get_error();

	*error_number = ublkd_nbd.get_errno();
	snprintf(error, error_size, "%s", message ? message : "unknown libnbd error");
}

/* A new handle, not connected: TLS refused, TCP or a unix socket only (the
 * config allows no more); NULL on failure. */
static struct nbd_handle *ublkd_nbd_handle(const char *name)
{
	struct nbd_handle *h = ublkd_nbd.create();

	if (!h)
		return NULL;
	if (ublkd_nbd.set_handle_name(h, name) == -1 ||
	    ublkd_nbd.set_uri_allow_tls(h, UBLKD_NBD_TLS_DISABLE) == -1 ||
	    ublkd_nbd.set_uri_allow_transports(h, UBLKD_NBD_ALLOW_TRANSPORT_TCP |
					       UBLKD_NBD_ALLOW_TRANSPORT_UNIX) == -1 ||
	    /* A READ answered in a simple reply takes 2 recv() calls, in a
	     * structured reply's chunk 4 (seen with strace in the guest); ublkd
	     * needs nothing structured replies add (holes, block status). */
	    ublkd_nbd.set_request_structured_replies(h, false) == -1) {
		ublkd_nbd.close(h);
		return NULL;
	}
	if (ublkd_nbd.set_pread_initialize)	/* a failed READ's buffer is never copied */
		ublkd_nbd.set_pread_initialize(h, false);
	return h;
}

/* A new handle connected to `uri`.  Blocking: Python calls it with the GIL
 * released.  NULL on failure, with libnbd's errno and message. */
static struct nbd_handle *ublkd_nbd_connect(const char *uri, const char *name,
					    int *error_number, char *error,
					    unsigned error_size)
{
	struct nbd_handle *h = ublkd_nbd_handle(name);

	if (!h || ublkd_nbd.connect_uri(h, uri) == -1) {
		ublkd_nbd_fail(error_number, error, error_size);
		if (h)
			ublkd_nbd.close(h);
		return NULL;
	}
	return h;
}

/* Read what the handshake said of the export into `export`; 0 or -1. */
static int ublkd_nbd_describe(struct nbd_handle *h, struct ublkd_nbd_export *export)
{
	export->size = ublkd_nbd.get_size(h);
	export->block_minimum = ublkd_nbd.get_block_size(h, UBLKD_NBD_SIZE_MINIMUM);
	export->block_preferred = ublkd_nbd.get_block_size(h, UBLKD_NBD_SIZE_PREFERRED);
	export->block_maximum = ublkd_nbd.get_block_size(h, UBLKD_NBD_SIZE_MAXIMUM);
	export->read_only = ublkd_nbd.is_read_only(h);
	export->can_flush = ublkd_nbd.can_flush(h);
	export->can_fua = ublkd_nbd.can_fua(h);
	export->can_trim = ublkd_nbd.can_trim(h);
	export->can_zero = ublkd_nbd.can_zero(h);
	export->can_multi_conn = ublkd_nbd.can_multi_conn(h);
	return export->size < 0 || export->block_minimum < 0 || export->block_preferred < 0 ||
	       export->block_maximum < 0 || export->read_only < 0 || export->can_flush < 0 ||
	       export->can_fua < 0 || export->can_trim < 0 || export->can_zero < 0 ||
	       export->can_multi_conn < 0 ? -1 : 0;
}

/* Connect to `uri`, describe the export, disconnect: what a new device is
 * made from.  0, or -1 with libnbd's errno and message. */
int ublkd_nbd_probe(const char *uri, const char *name, struct ublkd_nbd_export *export,
		    int *error_number, char *error, unsigned error_size)
{
	struct nbd_handle *h = ublkd_nbd_connect(uri, name, error_number, error, error_size);
	int ret;

	if (!h)
		return -1;
	ret = ublkd_nbd_describe(h, export);
	if (ret)
		ublkd_nbd_fail(error_number, error, error_size);
	ublkd_nbd.close(h);
	return ret;
}

/* -- serving: each queue drives its own connection from its own ring -------
 *
 * A request is sent with nbd_aio_*; its completion callback commits it to
 * the kernel.  libnbd runs callbacks inside the call that read the reply
 * (nbd_aio_notify_read), in this thread, so the commit lands on this
 * queue's ring like any other.  The socket is watched by one-shot polls on
 * the ring, armed for the directions libnbd asks for after every call.
 *
 * When the connection goes (the server killed or restarted), libnbd fails
 * every command with ENOTCONN: those requests are held, not answered, as
 * are the ones that come meanwhile; the queue reconnects (asynchronously,
 * through the same polls) with a growing delay and sends them again.  Past
 * reconnect_timeout the held requests fail with EIO, and so does new I/O
 * until the server is back (docs/nbd.md, section 5). */

#define UBLKD_NBD_BACKOFF_MIN 100000000ULL	/* 0.1 s */
#define UBLKD_NBD_BACKOFF_MAX 5000000000ULL	/* 5 s */
#define UBLKD_NBD_CONNECT_TIMEOUT 10000000000ULL	/* a handshake that never ends */

struct ublkd_nbd_request {
	struct ublkd_queue *q;
	uint16_t tag;
	int held;		/* waiting for a connection */
	int sent;		/* on the connection, its callback not yet run */
	int error;		/* the errno its command failed with, until settled */
	int32_t done;		/* the result of a success: bytes for READ/WRITE */
};

static int ublkd_nbd_arm(struct ublkd_queue *q);

static void ublkd_nbd_hold(struct ublkd_queue *q, unsigned tag)
{
	if (!q->nbd_requests[tag].held) {
		q->nbd_requests[tag].held = 1;
		q->nbd_held++;
	}
}

static int ublkd_nbd_done(void *user_data, int *error)
{
	struct ublkd_nbd_request *request = user_data;
	struct ublkd_queue *q = request->q;
	int ret;

	request->sent = 0;
	if (*error) {	/* decided once libnbd returns (ublkd_nbd_settle) */
		request->error = *error;
		q->nbd_failed[q->nbd_nfailed++] = request->tag;
		return 1;
	}
	q->nr_io++;
	ret = ublkd_queue_commit(q, request->tag, request->done);
	if (ret && !q->nbd_error)
		q->nbd_error = ret;
	return 1;	/* retire the command */
}

/* After a libnbd call: a command that failed because the connection went
 * (whatever errno libnbd gave it: ENOTCONN, ECONNRESET, EPIPE...) waits for
 * the next connection; one the server refused gets its error. */
static int ublkd_nbd_settle(struct ublkd_queue *q)
{
	int lost = !q->nbd || ublkd_nbd.aio_is_dead(q->nbd) || ublkd_nbd.aio_is_closed(q->nbd);
	unsigned i;
	int ret = 0;

	for (i = 0; i < q->nbd_nfailed; i++) {
		struct ublkd_nbd_request *request = &q->nbd_requests[q->nbd_failed[i]];
		int error = request->error;

		request->error = 0;
		if (lost || error == ENOTCONN || error == ESHUTDOWN) {
			ublkd_nbd_hold(q, request->tag);
			continue;
		}
		q->nr_io++;
		if (!ret)
			ret = ublkd_queue_commit(q, request->tag, -error);
	}
	q->nbd_nfailed = 0;
	return ret;
}

/* The connection is gone (or never came): drop it, try again later. */
static void ublkd_nbd_lost(struct ublkd_queue *q, uint64_t now)
{
	unsigned tag;

	/* nbd_close frees the commands still on the connection without calling
	 * their callbacks: they wait for the next connection too. */
	for (tag = 0; tag < q->depth; tag++) {
		if (q->nbd_requests[tag].sent) {
			q->nbd_requests[tag].sent = 0;
			ublkd_nbd_hold(q, tag);
		}
	}
	if (q->nbd)
		ublkd_nbd.close(q->nbd);
	q->nbd = NULL;
	q->nbd_connecting = 0;
	q->nbd_polling = 0;	/* polls on the closed fd end with an error, ignored */
	if (!q->nbd_lost_ns)
		q->nbd_lost_ns = now;
	q->nbd_backoff_ns = q->nbd_backoff_ns ? q->nbd_backoff_ns * 2 : UBLKD_NBD_BACKOFF_MIN;
	if (q->nbd_backoff_ns > UBLKD_NBD_BACKOFF_MAX)
		q->nbd_backoff_ns = UBLKD_NBD_BACKOFF_MAX;
	q->nbd_retry_ns = now + q->nbd_backoff_ns;
	q->nbd_wait_ns = (int64_t)UBLKD_NBD_BACKOFF_MIN;
}

/* Start connecting without blocking (for TCP, libnbd resolves the host
 * name synchronously: use an address in `uri` where that matters). */
static void ublkd_nbd_reconnect(struct ublkd_queue *q, uint64_t now)
{
	struct nbd_handle *h = ublkd_nbd_handle(q->nbd_name);

	q->nbd_reconnects++;
	if (!h || ublkd_nbd.aio_connect_uri(h, q->nbd_uri) == -1) {
		if (h)
			ublkd_nbd.close(h);
		ublkd_nbd_lost(q, now);
		return;
	}
	q->nbd = h;
	q->nbd_gen++;
	q->nbd_fd = ublkd_nbd.aio_get_fd(h);
	q->nbd_connecting = 1;
	q->nbd_retry_ns = now + UBLKD_NBD_CONNECT_TIMEOUT;
	if (ublkd_nbd.aio_is_ready(h) == 1)
		return;	/* ublkd_nbd_tick finishes it */
	if (ublkd_nbd_arm(q) < 0)
		ublkd_nbd_lost(q, now);
}

/* Answer a held request now: send it again, or fail it. */
static int ublkd_nbd_release(struct ublkd_queue *q, unsigned tag, int fail);

/* Every held request: sent on the new connection, or failed with EIO. */
static int ublkd_nbd_release_held(struct ublkd_queue *q, int fail)
{
	unsigned tag;
	int ret;

	for (tag = 0; tag < q->depth && q->nbd_held; tag++) {
		if (!q->nbd_requests[tag].held)
			continue;
		ret = ublkd_nbd_release(q, tag, fail);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Connected again: send what was held. */
static int ublkd_nbd_connected(struct ublkd_queue *q)
{
	int ret;

	q->nbd_connecting = 0;
	q->nbd_lost_ns = 0;
	q->nbd_backoff_ns = 0;
	q->nbd_failing = 0;
	q->nbd_wait_ns = 0;
	q->nbd_can_fua = ublkd_nbd.can_fua(q->nbd) == 1;
	ret = ublkd_nbd_release_held(q, 0);
	if (ret < 0)
		return ret;
	return ublkd_nbd_arm(q);
}

/* Called by the serving loop at every wake-up: reconnects when due, and
 * fails held requests once reconnect_timeout has passed. */
int ublkd_nbd_tick(struct ublkd_queue *q, uint64_t now)
{
	int ret;

	if (q->nbd && q->nbd_connecting && ublkd_nbd.aio_is_ready(q->nbd) == 1)
		return ublkd_nbd_connected(q);
	if (!q->nbd_lost_ns)
		return 0;
	if (!q->nbd_failing && (__atomic_load_n(&q->nbd_stopping, __ATOMIC_RELAXED) ||
				(q->nbd_timeout_ns && now > q->nbd_lost_ns + q->nbd_timeout_ns))) {
		q->nbd_failing = 1;
		ret = ublkd_nbd_release_held(q, 1);
		if (ret < 0)
			return ret;
	}
	if (now < q->nbd_retry_ns)
		return 0;
	if (q->nbd) {	/* a handshake that did not finish in time */
		ublkd_nbd_lost(q, now);
		return 0;
	}
	ublkd_nbd_reconnect(q, now);
	return 0;
}

int ublkd_nbd_attach(struct ublkd_queue *q, const char *uri, const char *name,
		     int64_t reconnect_timeout_ns, int *error_number, char *error,
		     unsigned error_size)
{
	unsigned tag;

	q->nbd_requests = calloc(q->depth, sizeof(*q->nbd_requests));
	q->nbd_failed = calloc(q->depth, sizeof(*q->nbd_failed));
	q->nbd_uri = strdup(uri);
	q->nbd_name = strdup(name);
	if (!q->nbd_requests || !q->nbd_failed || !q->nbd_uri || !q->nbd_name) {
		ublkd_nbd_detach(q);
		*error_number = ENOMEM;
		snprintf(error, error_size, "no memory for %u requests", q->depth);
		return -1;
	}
	for (tag = 0; tag < q->depth; tag++) {
		q->nbd_requests[tag].q = q;
		q->nbd_requests[tag].tag = tag;
	}
	q->nbd_timeout_ns = (uint64_t)reconnect_timeout_ns;
	q->backend_kind = UBLKD_KIND_NBD;
	/* A server that is not there (yet) is not an error: requests wait for
	 * it, as they would for a server that went away. */
	q->nbd = ublkd_nbd_connect(uri, name, error_number, error, error_size);
	if (!q->nbd) {
		ublkd_nbd_lost(q, ublkd_now_ns());
		q->nbd_retry_ns = 0;	/* the loop tries at once */
		return 1;
	}
	q->nbd_fd = ublkd_nbd.aio_get_fd(q->nbd);
	q->nbd_can_fua = ublkd_nbd.can_fua(q->nbd) == 1;
	return 0;
}

void ublkd_nbd_detach(struct ublkd_queue *q)
{
	if (q->nbd)
		ublkd_nbd.close(q->nbd);
	free(q->nbd_requests);
	free(q->nbd_failed);
	q->nbd_failed = NULL;
	free(q->nbd_uri);
	free(q->nbd_name);
	q->nbd = NULL;
	q->nbd_requests = NULL;
	q->nbd_uri = NULL;
	q->nbd_name = NULL;
}

/* Poll the socket for what libnbd waits for; 0 or a negative errno. */
static int ublkd_nbd_arm(struct ublkd_queue *q)
{
	unsigned wanted = ublkd_nbd.aio_get_direction(q->nbd);
	unsigned bit;

	for (bit = 1; bit <= 2; bit <<= 1) {
		struct io_uring_sqe *sqe;
		int err = 0;

		if (!(wanted & bit) || (q->nbd_polling & bit))
			continue;
		sqe = ublkd_sqe(q->ring, &err);
		if (!sqe)
			return err;
		io_uring_prep_poll_add(sqe, q->nbd_fd, bit == 1 ? POLLIN : POLLOUT);
		io_uring_sqe_set_data64(sqe, UBLKD_NBD_POLL | ((uint64_t)q->nbd_gen << 16) |
					     (bit >> 1));
		q->nbd_polling |= bit;
	}
	return 0;
}

/* Send request `tag` on the connection; 0 when sent or answered, else a
 * negative errno of the ring. */
static int ublkd_nbd_send(struct ublkd_queue *q, unsigned tag,
			  const struct ublkd_io_desc *d, void *buf)
{
	struct ublkd_nbd_request *request = &q->nbd_requests[tag];
	struct ublkd_nbd_completion done = { ublkd_nbd_done, request, NULL };
	unsigned op = d->op_flags & 0xff;
	uint64_t offset = d->start_sector << 9;
	uint64_t len = (uint64_t)d->nr_sectors << 9;
	uint32_t flags = 0;
	int64_t cookie;

	if ((d->op_flags & UBLKD_IO_F_FUA) && q->nbd_can_fua)
		flags |= UBLKD_NBD_CMD_FLAG_FUA;
	request->done = 0;
	request->sent = 1;	/* the callback clears it, maybe before the call returns */
	switch (op) {
	case UBLKD_OP_READ:
		request->done = (int32_t)len;
		cookie = ublkd_nbd.aio_pread(q->nbd, buf, len, offset, done, 0);
		break;
	case UBLKD_OP_WRITE:
		request->done = (int32_t)len;
		cookie = ublkd_nbd.aio_pwrite(q->nbd, buf, len, offset, done, flags);
		break;
	case UBLKD_OP_FLUSH:
		cookie = ublkd_nbd.aio_flush(q->nbd, done, 0);
		break;
	case UBLKD_OP_DISCARD:
		cookie = ublkd_nbd.aio_trim(q->nbd, len, offset, done, flags);
		break;
	default:	/* WRITE_ZEROES */
		if (d->op_flags & UBLKD_IO_F_NOUNMAP)
			flags |= UBLKD_NBD_CMD_FLAG_NO_HOLE;
		cookie = ublkd_nbd.aio_zero(q->nbd, len, offset, done, flags);
		break;
	}
	if (cookie == -1)
		request->sent = 0;	/* libnbd does not call back a command it refused */
	if (ublkd_nbd_settle(q) < 0)
		return -EBUSY;
	if (cookie == -1) {
		int err = ublkd_nbd.get_errno();

		if (ublkd_nbd.aio_is_dead(q->nbd) || ublkd_nbd.aio_is_closed(q->nbd)) {
			ublkd_nbd_hold(q, tag);
			ublkd_nbd_lost(q, ublkd_now_ns());
			return 0;
		}
		q->nr_io++;
		return ublkd_queue_commit(q, tag, -(err ? err : EIO));
	}
	return q->nbd_error;
}

static int ublkd_nbd_release(struct ublkd_queue *q, unsigned tag, int fail)
{
	const struct ublkd_io_desc *d =
		(const struct ublkd_io_desc *)(q->descs + (size_t)tag * sizeof(*d));

	q->nbd_requests[tag].held = 0;
	q->nbd_held--;
	if (fail) {
		q->nr_io++;
		return ublkd_queue_commit(q, tag, -EIO);
	}
	return ublkd_nbd_send(q, tag, d, (void *)(uintptr_t)ublkd_queue_buffer(q, tag));
}

/* A request for the nbd backend: sent (its callback commits it), held for
 * a connection, or failed; -ENOSYS hands an op we do not know to Python;
 * another negative errno: the ring failed. */
int ublkd_nbd_io(struct ublkd_queue *q, unsigned tag, const struct ublkd_io_desc *d, void *buf)
{
	unsigned op = d->op_flags & 0xff;
	int ret;

	if (op != UBLKD_OP_READ && op != UBLKD_OP_WRITE && op != UBLKD_OP_FLUSH &&
	    op != UBLKD_OP_DISCARD && op != UBLKD_OP_WRITE_ZEROES)
		return -ENOSYS;
	if (!q->nbd || q->nbd_connecting) {
		if (q->nbd_failing) {
			q->nr_io++;
			return ublkd_queue_commit(q, tag, -EIO);
		}
		ublkd_nbd_hold(q, tag);
		return 0;
	}
	ret = ublkd_nbd_send(q, tag, d, buf);
	if (ret < 0 || !q->nbd)
		return ret;
	return ublkd_nbd_arm(q);
}

/* Whether libnbd's next recv() on the socket returns at once: with bytes,
 * the end of the stream or an error.  A POLLIN completion does not say so:
 * io_uring completes a poll with the mask of the wake-up that fired it, and
 * by the time its CQE is handled this thread may have read those bytes
 * already (seen in the guest under load: a POLLIN CQE on an empty socket,
 * then a device whose next request was never sent: docs/nbd.md section 1,
 * "Replies").
 * MSG_PEEK rather than FIONREAD: FIONREAD says 0 at the end of the stream
 * too, and libnbd must read that end to notice a server that went away. */
static int ublkd_nbd_recv_ready(int fd)
{
	char byte;
	ssize_t r = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);

	return r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* The socket is readable: let libnbd read every reply already there.
 * libnbd reads one reply per nbd_aio_notify_read and then waits for the
 * next notification, however many more are queued; read them all in this
 * wake, so that their commits go out in one io_uring_enter and the poll
 * is armed once, not once per reply (docs/performance.md, "NBD").  Never
 * on an empty socket: there libnbd's recv() of a reply header fails with
 * EAGAIN and leaves it in REPLY.START, where it sends no new command until
 * a reply comes; with nothing in flight none ever comes, and the next
 * request waits forever. */
static void ublkd_nbd_read_replies(struct ublkd_queue *q)
{
	unsigned n;

	for (n = 0; n < q->depth && ublkd_nbd_recv_ready(q->nbd_fd); n++) {
		ublkd_nbd.aio_notify_read(q->nbd);
		if (ublkd_nbd.aio_is_ready(q->nbd) != 1)
			return;
	}
}

/* A poll on the socket fired: let libnbd read or write, which completes
 * requests through their callbacks; then poll again for what it needs. */
int ublkd_nbd_polled(struct ublkd_queue *q, uint64_t user_data, int32_t res)
{
	unsigned bit = (user_data & 1) ? 2 : 1;
	uint64_t now = ublkd_now_ns();
	int ret;

	if (!q->nbd || ((user_data >> 16) & 0xffff) != q->nbd_gen || !(q->nbd_polling & bit))
		return 0;	/* a poll of a connection already dropped */
	q->nbd_polling &= ~bit;
	if (res < 0) {
		ublkd_nbd_lost(q, now);
		return 0;
	}
	if (bit == 2)
		ublkd_nbd.aio_notify_write(q->nbd);
	else if (q->nbd_connecting)
		ublkd_nbd.aio_notify_read(q->nbd);
	else
		ublkd_nbd_read_replies(q);
	ret = ublkd_nbd_settle(q);
	if (ret < 0)
		return ret;
	if (q->nbd_error)
		return q->nbd_error;
	if (ublkd_nbd.aio_is_dead(q->nbd) || ublkd_nbd.aio_is_closed(q->nbd)) {
		ublkd_nbd_lost(q, now);	/* its requests are held now */
		return 0;
	}
	if (q->nbd_connecting && ublkd_nbd.aio_is_ready(q->nbd) == 1)
		return ublkd_nbd_connected(q);
	return ublkd_nbd_arm(q);
}
