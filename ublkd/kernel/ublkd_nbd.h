/* libnbd, loaded at run time (dlopen): ublkd does not depend on it unless a
 * device uses the nbd backend (docs/nbd.md, section 3).  The declarations
 * below follow libnbd.h of libnbd 1.4 and later (its ABI is versioned and
 * stable); tests/unit/test_nbd_abi.py compares the constants with the
 * installed libnbd.h. */
#ifndef UBLKD_NBD_H
#define UBLKD_NBD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct nbd_handle;

/* libnbd's nbd_completion_callback, passed by value. */
struct ublkd_nbd_completion {
	int (*callback)(void *user_data, int *error);
	void *user_data;
	void (*free)(void *user_data);
};

#define UBLKD_NBD_SIZE_MINIMUM 0
#define UBLKD_NBD_SIZE_PREFERRED 1
#define UBLKD_NBD_SIZE_MAXIMUM 2
#define UBLKD_NBD_CMD_FLAG_FUA 0x01
#define UBLKD_NBD_CMD_FLAG_NO_HOLE 0x02
#define UBLKD_NBD_TLS_DISABLE 0
#define UBLKD_NBD_ALLOW_TRANSPORT_TCP 0x01
#define UBLKD_NBD_ALLOW_TRANSPORT_UNIX 0x02
#define UBLKD_NBD_AIO_DIRECTION_READ 1
#define UBLKD_NBD_AIO_DIRECTION_WRITE 2

/* The libnbd functions ublkd calls, found by dlsym. */
struct ublkd_nbd_api {
	struct nbd_handle *(*create)(void);
	void (*close)(struct nbd_handle *h);
	const char *(*get_error)(void);
	int (*get_errno)(void);
	const char *(*get_version)(struct nbd_handle *h);
	int (*set_handle_name)(struct nbd_handle *h, const char *name);
	int (*set_uri_allow_tls)(struct nbd_handle *h, int tls);
	int (*set_uri_allow_transports)(struct nbd_handle *h, uint32_t mask);
	int (*supports_uri)(struct nbd_handle *h);
	int (*connect_uri)(struct nbd_handle *h, const char *uri);
	int (*aio_connect_uri)(struct nbd_handle *h, const char *uri);
	int (*aio_is_connecting)(struct nbd_handle *h);
	int (*aio_is_ready)(struct nbd_handle *h);
	int64_t (*get_size)(struct nbd_handle *h);
	int64_t (*get_block_size)(struct nbd_handle *h, int size_type);
	int (*is_read_only)(struct nbd_handle *h);
	int (*can_flush)(struct nbd_handle *h);
	int (*can_fua)(struct nbd_handle *h);
	int (*can_trim)(struct nbd_handle *h);
	int (*can_zero)(struct nbd_handle *h);
	int (*can_multi_conn)(struct nbd_handle *h);
	int (*aio_get_fd)(struct nbd_handle *h);
	unsigned (*aio_get_direction)(struct nbd_handle *h);
	int (*aio_notify_read)(struct nbd_handle *h);
	int (*aio_notify_write)(struct nbd_handle *h);
	int (*aio_is_dead)(struct nbd_handle *h);
	int (*aio_is_closed)(struct nbd_handle *h);
	int (*aio_in_flight)(struct nbd_handle *h);
	int64_t (*aio_pread)(struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
			     struct ublkd_nbd_completion done, uint32_t flags);
	int64_t (*aio_pwrite)(struct nbd_handle *h, const void *buf, size_t count,
			      uint64_t offset, struct ublkd_nbd_completion done, uint32_t flags);
	int64_t (*aio_flush)(struct nbd_handle *h, struct ublkd_nbd_completion done,
			     uint32_t flags);
	int64_t (*aio_trim)(struct nbd_handle *h, uint64_t count, uint64_t offset,
			    struct ublkd_nbd_completion done, uint32_t flags);
	int64_t (*aio_zero)(struct nbd_handle *h, uint64_t count, uint64_t offset,
			    struct ublkd_nbd_completion done, uint32_t flags);
	/* libnbd 1.12 and later; NULL before. */
	int (*set_pread_initialize)(struct nbd_handle *h, bool request);
	int (*set_request_structured_replies)(struct nbd_handle *h, bool request);
};

extern struct ublkd_nbd_api ublkd_nbd;

/* What a server's handshake says about an export. */
/* cffi begin */
struct ublkd_nbd_export {
	int64_t size;
	int64_t block_minimum;		/* 0: not advertised */
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
int ublkd_nbd_probe(const char *uri, const char *name, struct ublkd_nbd_export *export,
		    int *error_number, char *error, unsigned error_size);
/* cffi end */

#endif
