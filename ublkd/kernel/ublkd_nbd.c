/* libnbd at run time, and the handshake of a new device; see ublkd_nbd.h. */
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
	SYMBOL(get_size, 0), SYMBOL(get_block_size, 0), SYMBOL(is_read_only, 0),
	SYMBOL(can_flush, 0), SYMBOL(can_fua, 0), SYMBOL(can_trim, 0), SYMBOL(can_zero, 0),
	SYMBOL(can_multi_conn, 0), SYMBOL(aio_get_fd, 0), SYMBOL(aio_get_direction, 0),
	SYMBOL(aio_notify_read, 0), SYMBOL(aio_notify_write, 0), SYMBOL(aio_is_dead, 0),
	SYMBOL(aio_is_closed, 0), SYMBOL(aio_in_flight, 0), SYMBOL(aio_pread, 0),
	SYMBOL(aio_pwrite, 0), SYMBOL(aio_flush, 0), SYMBOL(aio_trim, 0), SYMBOL(aio_zero, 0),
	SYMBOL(set_pread_initialize, 1),
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

/* A new handle connected to `uri`: TLS refused, TCP or a unix socket only
 * (the config allows no more).  Blocking: Python calls it with the GIL
 * released.  NULL on failure, with libnbd's errno and message. */
static struct nbd_handle *ublkd_nbd_connect(const char *uri, const char *name,
					    int *error_number, char *error,
					    unsigned error_size)
{
	struct nbd_handle *h = ublkd_nbd.create();

	if (!h) {
		ublkd_nbd_fail(error_number, error, error_size);
		return NULL;
	}
	if (ublkd_nbd.set_handle_name(h, name) == -1 ||
	    ublkd_nbd.set_uri_allow_tls(h, UBLKD_NBD_TLS_DISABLE) == -1 ||
	    ublkd_nbd.set_uri_allow_transports(h, UBLKD_NBD_ALLOW_TRANSPORT_TCP |
					       UBLKD_NBD_ALLOW_TRANSPORT_UNIX) == -1 ||
	    ublkd_nbd.connect_uri(h, uri) == -1) {
		ublkd_nbd_fail(error_number, error, error_size);
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
 * the ring, armed for the directions libnbd asks for after every call. */

struct ublkd_nbd_request {
	struct ublkd_queue *q;
	uint16_t tag;
	int32_t done;		/* the result of a success: bytes for READ/WRITE */
};

int ublkd_nbd_attach(struct ublkd_queue *q, const char *uri, const char *name,
		     int *error_number, char *error, unsigned error_size)
{
	struct ublkd_nbd_request *requests = calloc(q->depth, sizeof(*requests));
	struct nbd_handle *h;
	unsigned tag;

	if (!requests) {
		*error_number = ENOMEM;
		snprintf(error, error_size, "no memory for %u requests", q->depth);
		return -1;
	}
	h = ublkd_nbd_connect(uri, name, error_number, error, error_size);
	if (!h) {
		free(requests);
		return -1;
	}
	if (ublkd_nbd.set_pread_initialize)	/* a failed READ's buffer is never copied */
		ublkd_nbd.set_pread_initialize(h, false);
	for (tag = 0; tag < q->depth; tag++) {
		requests[tag].q = q;
		requests[tag].tag = tag;
	}
	q->nbd = h;
	q->nbd_fd = ublkd_nbd.aio_get_fd(h);
	q->nbd_can_fua = ublkd_nbd.can_fua(h) == 1;
	q->nbd_requests = requests;
	q->nbd_polling = 0;
	q->backend_kind = UBLKD_KIND_NBD;
	return 0;
}

void ublkd_nbd_detach(struct ublkd_queue *q)
{
	if (q->nbd)
		ublkd_nbd.close(q->nbd);
	free(q->nbd_requests);
	q->nbd = NULL;
	q->nbd_requests = NULL;
}

static int ublkd_nbd_done(void *user_data, int *error)
{
	struct ublkd_nbd_request *request = user_data;
	struct ublkd_queue *q = request->q;
	int ret;

	q->nr_io++;
	ret = ublkd_queue_commit(q, request->tag, *error ? -*error : request->done);
	if (ret && !q->nbd_error)
		q->nbd_error = ret;
	return 1;	/* retire the command */
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
		io_uring_sqe_set_data64(sqe, UBLKD_NBD_POLL | (bit >> 1));
		q->nbd_polling |= bit;
	}
	return 0;
}

/* A request for the nbd backend: sent (its callback commits it), or
 * committed now with an error; -ENOSYS hands an op we do not know to
 * Python; another negative errno: the ring failed. */
int ublkd_nbd_io(struct ublkd_queue *q, unsigned tag, const struct ublkd_io_desc *d, void *buf)
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
	case UBLKD_OP_WRITE_ZEROES:
		if (d->op_flags & UBLKD_IO_F_NOUNMAP)
			flags |= UBLKD_NBD_CMD_FLAG_NO_HOLE;
		cookie = ublkd_nbd.aio_zero(q->nbd, len, offset, done, flags);
		break;
	default:
		return -ENOSYS;
	}
	if (cookie == -1) {
		int err = ublkd_nbd.get_errno();

		q->nr_io++;
		return ublkd_queue_commit(q, tag, -(err ? err : EIO));
	}
	if (q->nbd_error)
		return q->nbd_error;
	return ublkd_nbd_arm(q);
}

/* A poll on the socket fired: let libnbd read or write, which completes
 * requests through their callbacks; then poll again for what it needs. */
int ublkd_nbd_polled(struct ublkd_queue *q, uint64_t user_data, int32_t res)
{
	unsigned bit = (user_data & 1) ? 2 : 1;

	q->nbd_polling &= ~bit;
	if (!q->nbd)
		return 0;
	if (res >= 0 || res == -EINTR) {
		if (bit == 2 || (res & (POLLERR | POLLHUP)))
			ublkd_nbd.aio_notify_write(q->nbd);
		if (bit == 1 || (res & (POLLERR | POLLHUP)))
			ublkd_nbd.aio_notify_read(q->nbd);
	}
	if (q->nbd_error)
		return q->nbd_error;
	if (ublkd_nbd.aio_is_dead(q->nbd) || ublkd_nbd.aio_is_closed(q->nbd))
		return 0;	/* every request was failed by its callback (ENOTCONN) */
	return ublkd_nbd_arm(q);
}
