/* librados and librbd at run time, an image's opening and locks, and the
 * rbd backend's I/O path; see ublkd_rbd.h. */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#include "ublkd_rbd.h"
#include "ublkd_uring.h"

/* librbd's dependencies (librados) come with it: dlsym on its handle finds
 * their symbols too. */
#define UBLKD_LIBRBD "librbd.so.1"

struct ublkd_rbd_api ublkd_rbd;

struct ublkd_rbd_image {
	void *cluster;
	void *io;
	void *image;
};

/* One request in librbd's hands. */
struct ublkd_rbd_request {
	struct ublkd_rbd_request *next;	/* on the done list */
	struct ublkd_rbd_queue *owner;
	void *completion;
	int64_t result;
	uint32_t length;	/* what a READ or WRITE answers with */
	uint16_t tag;
};

/* A queue's side, allocated apart from the queue: a queue that ends while
 * librbd still holds requests (the cluster gone) leaves it to their late
 * callbacks instead of freeing memory they would write. */
struct ublkd_rbd_queue {
	struct ublkd_rbd_image *image;
	struct ublkd_rbd_request *done;	/* pushed by librbd's threads */
	int efd;
	uint64_t efd_value;	/* the ring's read of efd lands here */
	int reading;		/* that read is queued */
	unsigned in_flight;
	struct ublkd_rbd_request requests[];
};

struct ublkd_rbd_symbol {
	const char *name;
	void **slot;
};

#define SYMBOL(field) { #field, (void **)&ublkd_rbd.field }

static const struct ublkd_rbd_symbol ublkd_rbd_symbols[] = {
	SYMBOL(rados_create2), SYMBOL(rados_conf_read_file), SYMBOL(rados_conf_set),
	SYMBOL(rados_connect), SYMBOL(rados_shutdown), SYMBOL(rados_ioctx_create),
	SYMBOL(rados_ioctx_destroy), SYMBOL(rados_ioctx_set_namespace),
	SYMBOL(rados_get_instance_id), SYMBOL(rados_getaddrs), SYMBOL(rados_buffer_free),
	SYMBOL(rbd_open), SYMBOL(rbd_open_read_only), SYMBOL(rbd_close), SYMBOL(rbd_get_size),
	SYMBOL(rbd_get_features), SYMBOL(rbd_lock_acquire),
	SYMBOL(rbd_lock_get_owners), SYMBOL(rbd_lock_get_owners_cleanup), SYMBOL(rbd_lock_break),
	SYMBOL(rbd_metadata_get), SYMBOL(rbd_metadata_set), SYMBOL(rbd_watchers_list),
	SYMBOL(rbd_watchers_list_cleanup), SYMBOL(rbd_aio_create_completion),
	SYMBOL(rbd_aio_get_return_value), SYMBOL(rbd_aio_release), SYMBOL(rbd_aio_read2),
	SYMBOL(rbd_aio_write2), SYMBOL(rbd_aio_flush), SYMBOL(rbd_aio_discard),
	SYMBOL(rbd_aio_write_zeroes),
};

/* Load librbd once; 0, or -1 with what failed in `error`.  Python calls it
 * before any queue thread exists. */
int ublkd_rbd_load(char *error, unsigned error_size)
{
	static void *library;
	void *lib;
	size_t i;

	if (library)
		return 0;
	lib = dlopen(UBLKD_LIBRBD, RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		snprintf(error, error_size, "%s", dlerror());
		return -1;
	}
	for (i = 0; i < sizeof(ublkd_rbd_symbols) / sizeof(ublkd_rbd_symbols[0]); i++) {
		*ublkd_rbd_symbols[i].slot = dlsym(lib, ublkd_rbd_symbols[i].name);
		if (!*ublkd_rbd_symbols[i].slot) {
			snprintf(error, error_size, "%s has no %s (Ceph older than 14?)",
				 UBLKD_LIBRBD, ublkd_rbd_symbols[i].name);
			dlclose(lib);
			memset(&ublkd_rbd, 0, sizeof(ublkd_rbd));
			return -1;
		}
	}
	library = lib;
	return 0;
}

/* A failed step: its name and errno, for Python to explain. */
static int ublkd_rbd_failed(const char *step, int ret, int *error_number, char *error,
			    unsigned error_size)
{
	*error_number = -ret;
	snprintf(error, error_size, "%s: %s", step, strerror(-ret));
	return ret;
}

static int ublkd_rbd_set(void *cluster, const char *option, int seconds)
{
	char value[24];

	snprintf(value, sizeof(value), "%d", seconds);
	return ublkd_rbd.rados_conf_set(cluster, option, value);
}

/* The cluster session: conf file, identity, timeouts, connected. */
static int ublkd_rbd_connect(struct ublkd_rbd_image *img, const struct ublkd_rbd_target *t,
			     int *error_number, char *error, unsigned error_size)
{
	char name[128];
	int ret;

	snprintf(name, sizeof(name), "client.%s", t->client);
	ret = ublkd_rbd.rados_create2(&img->cluster, "ceph", name, 0);
	if (ret < 0)
		return ublkd_rbd_failed("rados_create2", ret, error_number, error, error_size);
	ret = ublkd_rbd.rados_conf_read_file(img->cluster, t->conf);
	if (ret < 0)
		return ublkd_rbd_failed("reading the ceph.conf", ret, error_number, error,
					error_size);
	if (t->keyring && (ret = ublkd_rbd.rados_conf_set(img->cluster, "keyring", t->keyring)) < 0)
		return ublkd_rbd_failed("setting the keyring", ret, error_number, error, error_size);
	/* A cluster that does not answer at start is reported in seconds, not
	 * after librados' 300 s. */
	ret = ublkd_rbd_set(img->cluster, "client_mount_timeout", t->connect_timeout);
	if (ret == 0 && t->io_timeout > 0) {
		ret = ublkd_rbd_set(img->cluster, "rados_osd_op_timeout", t->io_timeout);
		if (ret == 0)
			ret = ublkd_rbd_set(img->cluster, "rados_mon_op_timeout", t->io_timeout);
	}
	if (ret < 0)
		return ublkd_rbd_failed("setting the timeouts", ret, error_number, error,
					error_size);
	/* No librbd write-back cache: a write is answered once the OSDs have
	 * it, as krbd does.  Writes answered from the cache of a worker that
	 * is then killed were lost (fio verify in the guest, docs/rbd.md). */
	ret = ublkd_rbd.rados_conf_set(img->cluster, "rbd_cache", "false");
	if (ret < 0)
		return ublkd_rbd_failed("turning librbd's cache off", ret, error_number, error,
					error_size);
	ret = ublkd_rbd.rados_connect(img->cluster);
	if (ret < 0)
		return ublkd_rbd_failed("connecting to the cluster", ret, error_number, error,
					error_size);
	return 0;
}

/* Our session's identity, for the lock records of docs/rbd.md. */
static void ublkd_rbd_describe_session(struct ublkd_rbd_image *img,
				       struct ublkd_rbd_facts *facts)
{
	char *addrs = NULL;

	facts->instance_id = ublkd_rbd.rados_get_instance_id(img->cluster);
	facts->address[0] = 0;
	if (ublkd_rbd.rados_getaddrs(img->cluster, &addrs) == 0 && addrs) {
		snprintf(facts->address, sizeof(facts->address), "%s", addrs);
		ublkd_rbd.rados_buffer_free(addrs);
	}
}

/* Connect and open the image (read-only if asked, at `snapshot` if given).  Blocking:
 * Python calls it with the GIL released.  NULL on failure, with the errno
 * and the step that failed. */
struct ublkd_rbd_image *ublkd_rbd_open(const struct ublkd_rbd_target *t,
				       struct ublkd_rbd_facts *facts, int *error_number,
				       char *error, unsigned error_size)
{
	struct ublkd_rbd_image *img = calloc(1, sizeof(*img));
	int ret;

	if (!img) {
		ublkd_rbd_failed("allocating", -ENOMEM, error_number, error, error_size);
		return NULL;
	}
	ret = ublkd_rbd_connect(img, t, error_number, error, error_size);
	if (ret == 0) {
		ret = ublkd_rbd.rados_ioctx_create(img->cluster, t->pool, &img->io);
		if (ret < 0)
			ublkd_rbd_failed("opening the pool", ret, error_number, error, error_size);
	}
	if (ret == 0) {
		if (t->name_space)
			ublkd_rbd.rados_ioctx_set_namespace(img->io, t->name_space);
		ret = t->read_only
			? ublkd_rbd.rbd_open_read_only(img->io, t->image, &img->image, t->snapshot)
			: ublkd_rbd.rbd_open(img->io, t->image, &img->image, NULL);
		if (ret < 0)
			ublkd_rbd_failed("opening the image", ret, error_number, error, error_size);
	}
	if (ret == 0) {
		ret = ublkd_rbd.rbd_get_size(img->image, &facts->size);
		if (ret == 0)
			ret = ublkd_rbd.rbd_get_features(img->image, &facts->features);
		if (ret < 0)
			ublkd_rbd_failed("reading the image's header", ret, error_number, error,
					 error_size);
	}
	if (ret < 0) {
		ublkd_rbd_close(img);
		return NULL;
	}
	ublkd_rbd_describe_session(img, facts);
	return img;
}

/* Close the image and the session.  An image whose requests never came back
 * (the cluster gone at exit) blocks here: callers close at the end only. */
void ublkd_rbd_close(struct ublkd_rbd_image *img)
{
	if (!img)
		return;
	ublkd_rbd_let_go(img);	/* the image first, as at a hand-over */
	if (img->io)
		ublkd_rbd.rados_ioctx_destroy(img->io);
	if (img->cluster)
		ublkd_rbd.rados_shutdown(img->cluster);
	free(img);
}

/* Who holds the image's exclusive lock, one client address
 * ("127.0.0.1:0/1855586382") per line into `owners`; how many (0: nobody), or negative errno. */
int ublkd_rbd_lock_owners(struct ublkd_rbd_image *img, char *owners, unsigned size)
{
	char *list[8];
	size_t n = sizeof(list) / sizeof(list[0]), i, used = 0;
	int mode, ret;

	owners[0] = 0;
	ret = ublkd_rbd.rbd_lock_get_owners(img->image, &mode, list, &n);
	if (ret == -ENOENT)
		return 0;
	if (ret < 0)
		return ret;
	for (i = 0; i < n; i++) {
		int len = snprintf(owners + used, size - used, "%s\n", list[i]);

		if (len > 0 && used + (size_t)len < size)
			used += (size_t)len;
	}
	ublkd_rbd.rbd_lock_get_owners_cleanup(list, n);
	return (int)n;
}

/* Break `owner`'s exclusive lock; librbd blocklists it first
 * (rbd_blocklist_on_break_lock), so a client that is only slow cannot
 * write after us. */
int ublkd_rbd_lock_break(struct ublkd_rbd_image *img, const char *owner)
{
	return ublkd_rbd.rbd_lock_break(img->image, UBLKD_RBD_LOCK_MODE_EXCLUSIVE, owner);
}

/* Take the exclusive lock and keep it: a lock acquired by hand is not
 * handed to another client that asks for it, as librbd's automatic one is. */
int ublkd_rbd_lock_acquire(struct ublkd_rbd_image *img)
{
	return ublkd_rbd.rbd_lock_acquire(img->image, UBLKD_RBD_LOCK_MODE_EXCLUSIVE);
}

/* A hand-over: close the image, its lock and its watch with it, and keep
 * the session for the exit that follows.  A watch left to expire with the
 * process made the successor's first metadata update wait librbd's 5 s
 * notify timeout for an answer that never came. */
int ublkd_rbd_let_go(struct ublkd_rbd_image *img)
{
	int ret = 0;

	if (img->image)
		ret = ublkd_rbd.rbd_close(img->image);
	img->image = NULL;
	return ret;
}

/* The addresses of the clients watching the image's header (every client
 * that has it open read-write, ourselves included), one per line into
 * `addrs`; how many, or negative errno. */
int ublkd_rbd_watchers(struct ublkd_rbd_image *img, char *addrs, unsigned size)
{
	struct ublkd_rbd_watcher watchers[64];
	size_t n = sizeof(watchers) / sizeof(watchers[0]), i, used = 0;
	int ret = ublkd_rbd.rbd_watchers_list(img->image, watchers, &n);

	addrs[0] = 0;
	if (ret < 0)
		return ret;
	for (i = 0; i < n; i++) {
		int len = snprintf(addrs + used, size - used, "%s\n", watchers[i].addr);

		if (len > 0 && used + (size_t)len < size)
			used += (size_t)len;
	}
	ublkd_rbd.rbd_watchers_list_cleanup(watchers, n);
	return (int)n;
}

int ublkd_rbd_metadata_get(struct ublkd_rbd_image *img, const char *key, char *value,
			   unsigned size)
{
	size_t len = size;

	return ublkd_rbd.rbd_metadata_get(img->image, key, value, &len);
}

int ublkd_rbd_metadata_set(struct ublkd_rbd_image *img, const char *key, const char *value)
{
	return ublkd_rbd.rbd_metadata_set(img->image, key, value);
}

/* -- the I/O path ----------------------------------------------------------- */

/* On a librbd thread: hand the request to its queue.  The eventfd is written
 * only when the list was empty: a non-empty list already has a wake-up on
 * its way, which takes the whole list. */
static void ublkd_rbd_completed(void *completion, void *arg)
{
	struct ublkd_rbd_request *req = arg;
	struct ublkd_rbd_queue *rq = req->owner;
	struct ublkd_rbd_request *head = __atomic_load_n(&rq->done, __ATOMIC_RELAXED);
	uint64_t one = 1;

	req->result = ublkd_rbd.rbd_aio_get_return_value(completion);
	do {
		req->next = head;
	} while (!__atomic_compare_exchange_n(&rq->done, &head, req, 1, __ATOMIC_RELEASE,
					      __ATOMIC_RELAXED));
	if (!head && write(rq->efd, &one, sizeof(one)) < 0) {
		/* cannot fail: the queue reads the counter long before 2^64 */
	}
}

/* Queue the ring's read of the eventfd, if not queued. */
static int ublkd_rbd_arm(struct ublkd_queue *q)
{
	struct ublkd_rbd_queue *rq = q->rbd;
	struct io_uring_sqe *sqe;
	int err;

	if (rq->reading)
		return 0;
	sqe = ublkd_sqe(q->ring, &err);
	if (!sqe)
		return err;
	io_uring_prep_read(sqe, rq->efd, &rq->efd_value, sizeof(rq->efd_value), 0);
	io_uring_sqe_set_data64(sqe, UBLKD_RBD_WAKE);
	rq->reading = 1;
	return 0;
}

/* Serve this queue's requests on `image` (open, locked).  0, or negative
 * errno. */
int ublkd_rbd_attach(struct ublkd_queue *q, struct ublkd_rbd_image *image)
{
	struct ublkd_rbd_queue *rq = calloc(1, sizeof(*rq) + q->depth * sizeof(rq->requests[0]));
	unsigned tag;

	if (!rq)
		return -ENOMEM;
	rq->efd = eventfd(0, EFD_CLOEXEC);	/* blocking: io_uring returns EAGAIN on O_NONBLOCK */
	if (rq->efd < 0) {
		free(rq);
		return -errno;
	}
	rq->image = image;
	for (tag = 0; tag < q->depth; tag++) {
		rq->requests[tag].owner = rq;
		rq->requests[tag].tag = (uint16_t)tag;
	}
	q->rbd = rq;
	q->backend_kind = UBLKD_KIND_RBD;
	return ublkd_rbd_arm(q);
}

/* Stop serving.  Requests librbd still holds keep their memory and eventfd
 * for good (see struct ublkd_rbd_queue): only a queue that ends with the
 * cluster gone leaks, once. */
void ublkd_rbd_detach(struct ublkd_queue *q)
{
	struct ublkd_rbd_queue *rq = q->rbd;

	if (!rq)
		return;
	q->rbd = NULL;
	if (rq->in_flight)
		return;
	close(rq->efd);
	free(rq);
}

/* The request's result as ublk wants it: bytes for READ and WRITE, 0 for
 * the rest, or a negative errno (EIO for a timeout: the block layer knows
 * no ETIMEDOUT). */
static int32_t ublkd_rbd_result(const struct ublkd_rbd_request *req)
{
	if (req->result == -ETIMEDOUT)
		return -EIO;
	if (req->result < 0)
		return (int32_t)req->result;
	return (int32_t)req->length;
}

/* The eventfd's read completed: commit every request librbd has finished. */
int ublkd_rbd_woken(struct ublkd_queue *q)
{
	struct ublkd_rbd_queue *rq = q->rbd;
	struct ublkd_rbd_request *req;
	int ret = 0;

	if (!rq)
		return 0;
	rq->reading = 0;
	req = __atomic_exchange_n(&rq->done, NULL, __ATOMIC_ACQUIRE);
	while (req) {
		struct ublkd_rbd_request *next = req->next;

		ublkd_rbd.rbd_aio_release(req->completion);
		req->completion = NULL;
		rq->in_flight--;
		q->nr_io++;
		if (ret == 0)
			ret = ublkd_queue_commit(q, req->tag, ublkd_rbd_result(req));
		req = next;
	}
	if (ret < 0)
		return ret;
	return ublkd_rbd_arm(q);
}

/* Start the request on tag; 0 (its completion commits), or what
 * ublkd_queue_commit returns for a request answered at once. */
int ublkd_rbd_io(struct ublkd_queue *q, unsigned tag, const struct ublkd_io_desc *d, void *buf)
{
	struct ublkd_rbd_queue *rq = q->rbd;
	struct ublkd_rbd_request *req = &rq->requests[tag];
	void *image = rq->image->image;
	uint64_t off = d->start_sector << 9;
	uint64_t len = (uint64_t)d->nr_sectors << 9;
	unsigned op = d->op_flags & 0xff;
	int ret;

	if (op != UBLKD_OP_READ && op != UBLKD_OP_WRITE && op != UBLKD_OP_FLUSH &&
	    op != UBLKD_OP_DISCARD && op != UBLKD_OP_WRITE_ZEROES)
		return -ENOSYS;
	ret = ublkd_rbd.rbd_aio_create_completion(req, ublkd_rbd_completed, &req->completion);
	if (ret < 0)
		return ublkd_queue_commit(q, tag, ret);
	req->length = op == UBLKD_OP_READ || op == UBLKD_OP_WRITE ? (uint32_t)len : 0;
	switch (op) {
	case UBLKD_OP_READ:
		ret = ublkd_rbd.rbd_aio_read2(image, off, len, buf, req->completion, 0);
		break;
	case UBLKD_OP_WRITE:
		ret = ublkd_rbd.rbd_aio_write2(image, off, len, buf, req->completion,
					       d->op_flags & UBLKD_IO_F_FUA ?
					       UBLKD_RADOS_OP_FLAG_FADVISE_FUA : 0);
		break;
	case UBLKD_OP_FLUSH:
		ret = ublkd_rbd.rbd_aio_flush(image, req->completion);
		break;
	case UBLKD_OP_DISCARD:
		ret = ublkd_rbd.rbd_aio_discard(image, off, len, req->completion);
		break;
	default:
		ret = ublkd_rbd.rbd_aio_write_zeroes(image, off, len, req->completion, 0, 0);
		break;
	}
	if (ret < 0) {
		ublkd_rbd.rbd_aio_release(req->completion);
		req->completion = NULL;
		return ublkd_queue_commit(q, tag, ret);
	}
	rq->in_flight++;
	return 0;
}
