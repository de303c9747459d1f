"""The null backend: reads return zeros, writes are dropped.

Useful to measure the cost of ublkd itself, with no storage behind it.
"""

from __future__ import annotations

import ctypes
import errno

from ublkd.backends import Backend, FastPath, Request
from ublkd.config import DeviceConfig
from ublkd.kernel import uapi
from ublkd.kernel.uring import Ring


class NullBackend(Backend):
    supports_discard = True
    supports_write_zeroes = True

    def __init__(self, config: DeviceConfig):
        self.size = config.size

    def submit(self, ring: Ring, request: Request, user_data: int) -> int | None:
        if request.op == uapi.UBLK_IO_OP_READ:
            # The tag's buffer may still hold an earlier write's data.
            ctypes.memset(request.buffer, 0, request.length)
            return request.length
        if request.op == uapi.UBLK_IO_OP_WRITE:
            return request.length
        if request.op in (uapi.UBLK_IO_OP_FLUSH, uapi.UBLK_IO_OP_DISCARD,
                          uapi.UBLK_IO_OP_WRITE_ZEROES):
            return 0
        return -errno.EOPNOTSUPP

    def fast_path(self) -> FastPath:
        return FastPath("null")
