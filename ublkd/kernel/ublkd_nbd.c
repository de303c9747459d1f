/* libnbd at run time, and the handshake of a new device; see ublkd_nbd.h. */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "ublkd_nbd.h"

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

/* Connect to `uri` (TLS refused, TCP or a unix socket), read what the
 * handshake says of the export into `export`, and disconnect.  Blocking:
 * Python calls it with the GIL released.  0, or -1 with libnbd's errno and
 * message. */
int ublkd_nbd_probe(const char *uri, const char *name, struct ublkd_nbd_export *export,
		    int *error_number, char *error, unsigned error_size)
{
	struct nbd_handle *h = ublkd_nbd.create();
	int ret = -1;

	if (!h) {
		ublkd_nbd_fail(error_number, error, error_size);
		return -1;
	}
	if (ublkd_nbd.set_handle_name(h, name) == -1 ||
	    ublkd_nbd.set_uri_allow_tls(h, UBLKD_NBD_TLS_DISABLE) == -1 ||
	    ublkd_nbd.set_uri_allow_transports(h, UBLKD_NBD_ALLOW_TRANSPORT_TCP |
					       UBLKD_NBD_ALLOW_TRANSPORT_UNIX) == -1 ||
	    ublkd_nbd.connect_uri(h, uri) == -1)
		goto out;
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
	if (export->size < 0 || export->block_minimum < 0 || export->block_preferred < 0 ||
	    export->block_maximum < 0 || export->read_only < 0 || export->can_flush < 0 ||
	    export->can_fua < 0 || export->can_trim < 0 || export->can_zero < 0 ||
	    export->can_multi_conn < 0)
		goto out;
	ret = 0;
out:
	if (ret)
		ublkd_nbd_fail(error_number, error, error_size);
	ublkd_nbd.close(h);
	return ret;
}
