"""The life of one device, top to bottom: create, serve, stop.

`serve(config)` is what `ublkd serve NAME` runs.  Every step that takes a
resource registers how to give it back, so a failure at any point unwinds
what was done and leaves no device, state file or fd behind:

    open backend -> ADD_DEV -> SET_PARAMS -> save state -> open /dev/ublkcN
    -> queues fetch -> START_DEV -> serve ... SIGTERM -> STOP_DEV
    -> queues see ABORT -> close /dev/ublkcN -> DEL_DEV -> remove state
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone

from ublkd import __version__
from ublkd.backends import Backend, open_backend
from ublkd.config import DeviceConfig
from ublkd.errors import DeviceBusyError, DeviceNotFoundError, KernelError, NotRootError
from ublkd.kernel import uapi
from ublkd.kernel.control import ControlDevice, DeviceInfo, Params
from ublkd.kernel.queue import Queue
from ublkd.state import DeviceState, load_state, remove_state, save_state

log = logging.getLogger(__name__)

IO_BUFFER_BYTES = 512 * 1024  # per tag; also the largest request the kernel sends
CHAR_DEVICE_WAIT = 5.0  # seconds for /dev/ublkcN to appear after ADD_DEV

RECOVERY_FLAGS = {
    "reissue": uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE,
    "abort": uapi.UBLK_F_USER_RECOVERY,
    "none": 0,
}


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError(
            "ublk control commands need root (CAP_SYS_ADMIN); run as root or "
            "through `systemctl start ublkd@NAME`"
        )


class Device:
    """One served ublk device; `run()` returns after a clean stop."""

    def __init__(self, config: DeviceConfig, control: ControlDevice):
        self.config = config
        self.control = control
        self.name = config.name
        self.stop_requested = threading.Event()
        self.queues: list[Queue] = []
        self.info: DeviceInfo | None = None

    # -- the steps, in order -------------------------------------------------
    def run(self) -> None:
        with contextlib.ExitStack() as undo:
            self.clear_stale_state()
            backend = open_backend(self.config)
            undo.callback(backend.close)
            undo.callback(remove_state, self.name)
            self.info = self.add_device()
            undo.callback(self.delete_device)
            self.control.set_params(self.info.dev_id, self.params_for(backend))
            self.save_state()
            char_fd = self.open_char_device()
            undo.callback(os.close, char_fd)
            undo.callback(self.join_queues)
            self.start_queues(char_fd, backend)
            undo.callback(self.stop_device)
            self.control.start_device(self.info.dev_id, os.getpid())
            log.info("%s: serving /dev/ublkb%d (%s backend, %d queue(s) of depth %d)",
                     self.name, self.info.dev_id, self.config.backend,
                     self.info.nr_queues, self.info.queue_depth)
            self.wait_for_stop()
            log.info("%s: stopping /dev/ublkb%d", self.name, self.info.dev_id)

    def clear_stale_state(self) -> None:
        """A state file whose device is gone (a reboot) is dropped; a live one refuses."""
        state = load_state(self.name)
        if state is None:
            return
        try:
            info = self.control.get_info(state.dev_id)
        except DeviceNotFoundError:
            log.info("%s: dropping state of /dev/ublkb%d, which no longer exists",
                     self.name, state.dev_id)
            remove_state(self.name)
            return
        raise DeviceBusyError(
            f"{self.name}: /dev/ublkb{state.dev_id} already exists ({info.state_name}, "
            f"server pid {info.pid}). If ublkd@{self.name} is running, stop it with "
            f"`systemctl stop ublkd@{self.name}`; if no server is left, remove the "
            f"device with `ublkd delete {self.name}`."
        )

    def add_device(self) -> DeviceInfo:
        wanted = self.config.dev_id
        if wanted is not None:
            self.refuse_taken_id(wanted)
        flags = RECOVERY_FLAGS[self.config.recovery]
        if self.control.ioctl_encode:
            flags |= uapi.UBLK_F_CMD_IOCTL_ENCODE
        info = self.control.add_device(
            dev_id=wanted,
            nr_queues=self.config.queues,
            queue_depth=self.config.queue_depth,
            max_io_buf_bytes=IO_BUFFER_BYTES,
            flags=flags,
        )
        if info.nr_queues != self.config.queues:
            log.warning("%s: the kernel gave %d queue(s) of the %d asked for (one per CPU "
                        "at most)", self.name, info.nr_queues, self.config.queues)
        missing = RECOVERY_FLAGS[self.config.recovery] & ~info.flags
        if missing:
            self.control.delete_device(info.dev_id)
            raise KernelError(
                f"{self.name}: this kernel does not support recovery = "
                f"\"{self.config.recovery}\" (ADD_DEV dropped flags {missing:#x}); "
                f"set recovery = \"none\" in {self.config.source} or use a kernel >= 6.1"
            )
        return info

    def refuse_taken_id(self, dev_id: int) -> None:
        try:
            info = self.control.get_info(dev_id)
        except DeviceNotFoundError:
            return
        raise DeviceBusyError(
            f"{self.config.source}: id = {dev_id} is taken: /dev/ublkb{dev_id} exists "
            f"({info.state_name}, server pid {info.pid}); choose another id or remove "
            f"that device first"
        )

    def params_for(self, backend: Backend) -> Params:
        cfg = self.config
        return Params(
            logical_block_size=cfg.logical_block_size,
            physical_block_size=max(cfg.logical_block_size, 4096),
            io_min=cfg.logical_block_size,
            io_opt=0,
            max_sectors=IO_BUFFER_BYTES >> 9,
            dev_sectors=backend.size >> 9,
            # A volatile cache makes the block layer send FLUSH, which the
            # file backend turns into fdatasync.
            volatile_cache=cfg.backend == "file",
            discard_granularity=4096 if backend.supports_discard else 0,
            max_discard_sectors=(1 << 30) >> 9 if backend.supports_discard else 0,
            max_write_zeroes_sectors=(1 << 30) >> 9 if backend.supports_discard else 0,
            max_discard_segments=1 if backend.supports_discard else 0,
        )

    def save_state(self) -> None:
        now = datetime.now(timezone.utc).isoformat()
        save_state(DeviceState(
            name=self.name,
            dev_id=self.info.dev_id,
            flags=self.info.flags,
            params=self.control.get_params(self.info.dev_id).to_dict(),
            config=self.config.to_dict(),
            pid=os.getpid(),
            generation=1,
            created=now,
            updated=now,
            version=__version__,
        ))

    def open_char_device(self) -> int:
        """Open /dev/ublkcN, which devtmpfs creates right after ADD_DEV.

        O_CLOEXEC: a child holding it would keep the kernel from recovering
        the device after we die.
        """
        path = f"/dev/ublkc{self.info.dev_id}"
        deadline = time.monotonic() + CHAR_DEVICE_WAIT
        while True:
            try:
                return os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise KernelError(f"{self.name}: {path} did not appear after ADD_DEV")
                time.sleep(0.05)

    def start_queues(self, char_fd: int, backend: Backend) -> None:
        fetch_op, commit_op = uapi.io_opcodes(bool(self.info.flags & uapi.UBLK_F_CMD_IOCTL_ENCODE))
        for q_id in range(self.info.nr_queues):
            queue = Queue(char_fd, q_id, self.info.queue_depth, self.info.max_io_buf_bytes,
                          backend, fetch_op, commit_op)
            self.queues.append(queue)
            queue.start()
        for queue in self.queues:
            queue.fetching.wait()
            if queue.error:
                raise KernelError(f"{self.name}: queue {queue.q_id} could not start: {queue.error}")

    def wait_for_stop(self) -> None:
        """Until SIGTERM/SIGINT, or a queue dies (which is an error)."""
        while not self.stop_requested.wait(1.0):
            for queue in self.queues:
                if not queue.alive:
                    raise KernelError(
                        f"{self.name}: queue {queue.q_id} stopped serving: {queue.error}"
                    )

    # -- undo steps ------------------------------------------------------------
    def stop_device(self) -> None:
        with contextlib.suppress(DeviceNotFoundError):
            self.control.stop_device(self.info.dev_id)

    def join_queues(self) -> None:
        """After STOP_DEV every fetched tag ends with ABORT and the threads end;
        a device that never started needs them told."""
        for queue in self.queues:
            queue.stop.set()
        for queue in self.queues:
            queue.join()

    def delete_device(self) -> None:
        try:
            self.control.delete_device(self.info.dev_id)
        except DeviceNotFoundError:
            pass
        except KernelError as exc:
            log.error("%s: could not delete /dev/ublkb%d: %s", self.name, self.info.dev_id, exc)
            raise

    def request_stop(self, signum: int, _frame) -> None:
        log.info("%s: %s received", self.name, signal.Signals(signum).name)
        self.stop_requested.set()


def serve(config: DeviceConfig) -> None:
    """Create the device `config` describes and serve it until SIGTERM/SIGINT."""
    require_root()
    with contextlib.closing(ControlDevice()) as control:
        device = Device(config, control)
        signal.signal(signal.SIGTERM, device.request_stop)
        signal.signal(signal.SIGINT, device.request_stop)
        device.run()

