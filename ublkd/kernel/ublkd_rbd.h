/* librados and librbd, loaded at run time (dlopen): installing ublkd pulls
 * no Ceph, and only a device with backend = "rbd" needs them (docs/rbd.md).
 * The declarations follow librbd.h and librados.h of Ceph 14 (Nautilus) and
 * later, whose C ABI is stable; tests/unit/test_rbd_abi.py compares the
 * constants with the installed headers.
 *
 * The I/O path: a queue thread starts rbd_aio_* requests; librbd completes
 * them on its own threads, whose callback only pushes the request onto the
 * queue's lock-free list and, when that list was empty, writes the queue's
 * eventfd.  The queue's ring has a read on that eventfd: its CQE makes the
 * queue thread take the whole list and commit each request.  librbd's
 * threads never touch a ublk command or the ring. */
#ifndef UBLKD_RBD_H
#define UBLKD_RBD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define UBLKD_RBD_LOCK_MODE_EXCLUSIVE 0
#define UBLKD_RADOS_OP_FLAG_FADVISE_FUA 0x80

/* librbd's rbd_image_watcher_t. */
struct ublkd_rbd_watcher {
	char *addr;
	int64_t id;
	uint64_t cookie;
};

typedef void (*ublkd_rbd_callback)(void *completion, void *arg);

/* The librados and librbd functions ublkd calls, found by dlsym. */
struct ublkd_rbd_api {
	int (*rados_create2)(void **cluster, const char *cluster_name, const char *name,
			     uint64_t flags);
	int (*rados_conf_read_file)(void *cluster, const char *path);
	int (*rados_conf_set)(void *cluster, const char *option, const char *value);
	int (*rados_connect)(void *cluster);
	void (*rados_shutdown)(void *cluster);
	int (*rados_ioctx_create)(void *cluster, const char *pool, void **io);
	void (*rados_ioctx_destroy)(void *io);
	void (*rados_ioctx_set_namespace)(void *io, const char *name_space);
	uint64_t (*rados_get_instance_id)(void *cluster);
	int (*rados_getaddrs)(void *cluster, char **addrs);
	void (*rados_buffer_free)(char *buf);
	int (*rbd_open)(void *io, const char *name, void **image, const char *snap_name);
	int (*rbd_open_read_only)(void *io, const char *name, void **image,
				  const char *snap_name);
	int (*rbd_close)(void *image);
	int (*rbd_get_size)(void *image, uint64_t *size);
	int (*rbd_get_features)(void *image, uint64_t *features);
	int (*rbd_lock_acquire)(void *image, int lock_mode);
	int (*rbd_lock_get_owners)(void *image, int *lock_mode, char **owners, size_t *max);
	void (*rbd_lock_get_owners_cleanup)(char **owners, size_t count);
	int (*rbd_lock_break)(void *image, int lock_mode, const char *owner);
	int (*rbd_metadata_get)(void *image, const char *key, char *value, size_t *len);
	int (*rbd_metadata_set)(void *image, const char *key, const char *value);
	int (*rbd_watchers_list)(void *image, struct ublkd_rbd_watcher *watchers, size_t *max);
	void (*rbd_watchers_list_cleanup)(struct ublkd_rbd_watcher *watchers, size_t count);
	int (*rbd_aio_create_completion)(void *arg, ublkd_rbd_callback cb, void **completion);
	ssize_t (*rbd_aio_get_return_value)(void *completion);
	void (*rbd_aio_release)(void *completion);
	int (*rbd_aio_read2)(void *image, uint64_t off, size_t len, char *buf,
			     void *completion, int op_flags);
	int (*rbd_aio_write2)(void *image, uint64_t off, size_t len, const char *buf,
			      void *completion, int op_flags);
	int (*rbd_aio_flush)(void *image, void *completion);
	int (*rbd_aio_discard)(void *image, uint64_t off, uint64_t len, void *completion);
	int (*rbd_aio_write_zeroes)(void *image, uint64_t off, size_t len, void *completion,
				    int zero_flags, int op_flags);
};

extern struct ublkd_rbd_api ublkd_rbd;

struct ublkd_rbd_image;

/* cffi begin */
/* Where an image is and who opens it: the config's keys (NULL: Ceph's
 * default).  read_only: opened read-only (always with a snapshot), as
 * `rbd device map --read-only` does: no lock, and a cephx user with only
 * `profile rbd-read-only` may serve it.  io_timeout: seconds an OSD or
 * monitor request may take before it fails (librados'
 * rados_osd_op_timeout); 0: forever. */
struct ublkd_rbd_target {
	const char *conf;
	const char *client;
	const char *keyring;
	const char *pool;
	const char *name_space;
	const char *image;
	const char *snapshot;
	int read_only;
	int connect_timeout;
	int io_timeout;
};

/* What the image and our session are, once open. */
struct ublkd_rbd_facts {
	uint64_t size;
	uint64_t features;
	uint64_t instance_id;	/* our session: client.<instance_id> */
	char address[256];	/* our session's address, as locks and blocklists name it */
};


int ublkd_rbd_load(char *error, unsigned error_size);
struct ublkd_rbd_image *ublkd_rbd_open(const struct ublkd_rbd_target *target,
				       struct ublkd_rbd_facts *facts, int *error_number,
				       char *error, unsigned error_size);
void ublkd_rbd_close(struct ublkd_rbd_image *image);
int ublkd_rbd_lock_owners(struct ublkd_rbd_image *image, char *owners, unsigned size);
int ublkd_rbd_lock_break(struct ublkd_rbd_image *image, const char *owner);
int ublkd_rbd_lock_acquire(struct ublkd_rbd_image *image);
int ublkd_rbd_let_go(struct ublkd_rbd_image *image);
int ublkd_rbd_watchers(struct ublkd_rbd_image *image, char *addrs, unsigned size);
int ublkd_rbd_metadata_get(struct ublkd_rbd_image *image, const char *key, char *value,
			   unsigned size);
int ublkd_rbd_metadata_set(struct ublkd_rbd_image *image, const char *key, const char *value);
/* cffi end */

#endif
