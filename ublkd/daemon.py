"""The life of one device, top to bottom: create or recover, serve, stop.

`serve(config)` is what `ublkd serve NAME` runs.  It decides from the state
file and the kernel what to do:

    no device of ours (no state, or a reboot removed it)       -> CREATE
    our device QUIESCED, or LIVE with its server dead          -> RECOVER
    our device LIVE with a live server                         -> refuse
    our device DEAD (a start crashed before START_DEV)         -> delete it, CREATE

"Our device" is the one the state file names if the kernel agrees, else
the one carrying our cookie (ublkd/identity.py): a corrupt or lost state
file is rebuilt from the kernel and the config instead of ending the
device, and a stale one never makes us touch another device.

CREATE:  open backend -> ADD_DEV -> SET_PARAMS -> save state -> open
         /dev/ublkcN -> queues fetch -> START_DEV
RECOVER: open backend -> START_USER_RECOVERY (retried while the old server
         goes away) -> save state (generation + 1) -> open /dev/ublkcN ->
         queues fetch -> END_USER_RECOVERY(our pid)
SERVE:   READY=1; watchdog pings while every queue is healthy
STOP:    (SIGTERM) STOPPING=1 -> STOP_DEV -> queues see ABORT -> close
         /dev/ublkcN -> DEL_DEV -> remove state

A failed CREATE unwinds everything it did: no device, state or fd is left.
A failed RECOVER leaves the device as it found it, waiting with its queued
I/O for the next attempt: deleting it would fail the I/O of every
application using it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import faulthandler
import logging
import os
import select
import signal
import threading
import time
from datetime import UTC, datetime
from typing import NoReturn

from ublkd import __version__, identity, systemd
from ublkd.backends import Backend, connects_to_server, open_backend
from ublkd.config import DeviceConfig, load_config
from ublkd.errors import (ConfigError, CorruptStateError, DeviceBusyError, DeviceNotFoundError,
                          HandOverRefusedError,
                          KernelError, NotRootError, StateError, UblkdError)
from ublkd.handover import RECOVERY_FLAGS, hand_over_loss
from ublkd.kernel import uapi
from ublkd.kernel.control import ControlDevice, DeviceInfo, Params
from ublkd.kernel.queue import Queue
from ublkd.state import (DeviceState, corrupt_state_kept, load_state, next_generation,
                         quarantine_state, remove_state, save_state)
from ublkd.succession import EXIT_HANDED_OVER, READY, TOOK_OVER, Predecessor
from ublkd.supervisor import EXIT_SIGNALLED_BASE, drain
from ublkd.systemd import Notifier

log = logging.getLogger(__name__)

IO_BUFFER_BYTES = 512 * 1024  # per tag; also the largest request the kernel sends
CHAR_DEVICE_WAIT = 5.0  # seconds for /dev/ublkcN to appear after ADD_DEV
RECOVERY_WAIT = 30.0  # seconds START_USER_RECOVERY is retried while EBUSY
RECOVERY_RETRY = 0.1
# Retried this often for the first FAST_RETRY_SECONDS: a hand-over's
# successor waits for its predecessor's exit, while the device's I/O waits.
FAST_RETRY = 0.002
FAST_RETRY_SECONDS = 2.0
QUEUE_SILENCE_LIMIT = 10.0  # a queue loop that has not run for this long is stuck
# QUIESCE_DEV waits at most this long for each queue to have an idle tag.
QUIESCE_TIMEOUT_MS = 10_000

# What a device is made of; an existing device keeps them (keep_settings_of).
DEVICE_SHAPING_KEYS = ("backend", "path", "size", "logical_block_size", "recovery")

def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError(
            "ublk control commands need root (CAP_SYS_ADMIN); run as root or "
            "through `systemctl start ublkd@NAME`"
        )


def server_alive(pid: int) -> bool:
    """Whether `pid` is a running ublkd (a dead server's pid may be reused)."""
    if pid <= 0:
        return False
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
    return b"ublkd" in cmdline


def now() -> str:
    return datetime.now(UTC).isoformat()


class PauseClock:
    """The steps of a hand-over's I/O pause, as the successor sees them: the
    journal then says where the time of a slow upgrade went."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, step: str) -> None:
        now_ = time.monotonic()
        self.laps.append((step, now_ - self.last))
        self.last = now_

    def __str__(self) -> str:
        steps = ", ".join(f"{step} {seconds * 1000:.0f} ms" for step, seconds in self.laps)
        return f"{(self.last - self.started) * 1000:.0f} ms ({steps})"


class StopRequests:
    """SIGTERM, SIGINT and SIGUSR2 as the serving loop sees them.

    A Python signal handler runs in the main thread between two bytecodes,
    possibly while that thread holds the lock inside threading.Event.wait;
    a handler that called Event.set() then waited for that lock forever.
    Seen in the guest: a stop hung until systemd's 90 s timeout when the
    unit's SIGTERM and the one the supervisor forwards arrived 7 ms apart.
    So the handler takes no lock, it only records the signal, and the loop
    waits on a pipe that the interpreter's C-level handler writes to
    (signal.set_wakeup_fd) the moment a signal arrives: a handler run from
    the loop itself would miss a signal that lands just before the loop
    enters select(), which then slept its whole timeout (seen in a unit
    test: 60 s).
    """

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def listen(self, signums: tuple[int, ...]) -> None:
        """Record `signums` from now on; only the main thread may call this."""
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self.record)

    def record(self, signum: int, _frame) -> None:
        """The signal handler."""
        self.signals.append(signum)

    def wait(self, timeout: float) -> bool:
        """True once a stop was asked for, else after `timeout` seconds."""
        if not self.signals:
            select.select([self.read_fd], [], [], timeout)
        return bool(self.signals)

    @property
    def hand_over(self) -> bool:
        return signal.SIGUSR2 in self.signals

    def forget_hand_over(self) -> None:
        """Drop a refused SIGUSR2 (and its wake-up bytes): serving goes on."""
        self.signals = [signum for signum in self.signals if signum != signal.SIGUSR2]
        drain(self.read_fd)

    def names(self) -> str:
        return ", ".join(signal.Signals(signum).name for signum in dict.fromkeys(self.signals))


class Device:
    """One served ublk device; `run()` returns after a clean stop."""

    def __init__(self, config: DeviceConfig, control: ControlDevice, notifier: Notifier,
                 config_error: ConfigError | None = None,
                 predecessor: Predecessor | None = None):
        self.config = config
        # This process was started to take the device over from a running
        # worker (ublkd/succession.py).
        self.predecessor = predecessor
        # Set when /etc/ublkd/NAME.toml is wrong and `config` is the one kept in
        # the state file: good to recover an existing device, never to create one.
        self.config_error = config_error
        self.control = control
        self.notifier = notifier
        self.name = config.name
        self.stop = StopRequests()
        self.queues: list[Queue] = []
        self.info: DeviceInfo | None = None
        self.state: DeviceState | None = None
        self.backend_late: str | None = None  # what STATUS last said about the backend
        self.handing_over = False  # SIGUSR2, or SIGTERM of a restart: leave the device

    # -- deciding --------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped (0) or until handed over to a successor."""
        previous, existing, had_state = self.find_device()
        if existing is None and self.config_error is not None:
            raise self.config_error
        if self.config_error is not None:
            log.error("%s: %s", self.name, self.config_error)
            log.warning("%s: recovering /dev/ublkb%d with the configuration it was created "
                        "with (its state file); fix the file, it applies at the next create",
                        self.name, existing.dev_id)
        if self.predecessor is not None:
            self.refuse_impossible_take_over(existing)
        if existing is None:
            self.create_and_serve(previous, may_create=not had_state)
        else:
            self.recover_and_serve(previous, existing)
        return EXIT_HANDED_OVER if self.handing_over else 0

    def refuse_impossible_take_over(self, existing: DeviceInfo | None) -> None:
        """A successor checks that the device is one it can take over before
        anything else (the old worker serves on when it cannot)."""
        if existing is None or existing.pid != self.predecessor.pid:
            served = f"served by pid {existing.pid}" if existing else "gone"
            raise DeviceNotFoundError(
                f"{self.name}: started to take the device over from pid "
                f"{self.predecessor.pid}, but it is {served}; nothing taken over")
        loss = hand_over_loss(existing.flags)
        if loss is not None:
            raise HandOverRefusedError(f"{self.name}: not handed over: /dev/ublkb"
                                       f"{existing.dev_id} {loss.removeprefix('the kernel ')}")
        log.info("%s: taking /dev/ublkb%d over from pid %d", self.name, existing.dev_id,
                 existing.pid)

    def let_the_predecessor_go(self) -> PauseClock:
        """Tell the predecessor's main process that its worker may let go.
        Said once the backend is open and checked and the queues are ready
        (a backend that connects to a server excepted), so that the I/O
        pause of the hand-over is only its drain and exit and our
        START_USER_RECOVERY, FETCHes and END_USER_RECOVERY.  The pause
        starts here: the clock returned times its steps."""
        if self.predecessor is not None:
            self.predecessor.say(READY)
        return PauseClock()

    def find_device(self) -> tuple[DeviceState | None, DeviceInfo | None, bool]:
        """(the state to go by, our kernel device to recover or None, whether
        a state file existed: then the device held data, and a missing
        backing file must not be created empty)."""
        corrupt = False
        try:
            previous = load_state(self.name)
        except CorruptStateError as error:
            log.error("%s: %s", self.name, error)
            previous, corrupt = None, True
        had_state = previous is not None or corrupt or corrupt_state_kept(self.name)
        info = identity.find_device(self.control, self.name, previous, self.config.dev_id)
        if corrupt:
            self.set_corrupt_state_aside(info)
        if info is None:
            if previous is not None:
                log.info("%s: /dev/ublkb%d of the state file no longer exists (reboot?); "
                         "creating the device anew", self.name, previous.dev_id)
            return previous, None, had_state
        if previous is None or previous.dev_id != info.dev_id:
            previous = self.rebuilt_state(info)
        return previous, self.existing_device(info), had_state

    def set_corrupt_state_aside(self, info: DeviceInfo | None) -> None:
        """Move the unusable state file aside, unless the device cannot be told apart
        from others: then refuse, naming the devices an admin must look at."""
        suspects = [] if info is not None else identity.cookieless_devices(self.control)
        if suspects:
            listed = ", ".join(f"/dev/ublkb{dev_id}" for dev_id in suspects)
            raise StateError(
                f"{self.name}: its state file is unusable (above) and the kernel cannot say "
                f"which device is {self.name}'s: {listed} carry no ublkd cookie (made by "
                f"ublkd 0.1 or another server). ublkd does not serve a device from a "
                f"guess: set `id` in {self.config.source} to the right one, or remove a "
                f"device with `ublkd delete --id N`")
        kept = quarantine_state(self.name)
        found = f"found /dev/ublkb{info.dev_id} by its cookie" if info else "no device of its"
        log.warning("%s: state file moved aside to %s; %s in the kernel", self.name, kept,
                    found)

    def rebuilt_state(self, info: DeviceInfo) -> DeviceState:
        """The state file's content, from the kernel (id, flags, parameters) and the
        config: for a device whose state file was corrupt or lost.  The
        recovery count starts over."""
        log.warning("%s: rebuilding its state from the kernel's /dev/ublkb%d and %s",
                    self.name, info.dev_id, self.config.source)
        moment = now()
        return DeviceState(
            name=self.name, dev_id=info.dev_id, flags=info.flags,
            params=self.control.get_params(info.dev_id).to_dict(),
            config=self.config.to_dict(), pid=info.pid, generation=1, created=moment,
            updated=moment)

    def existing_device(self, info: DeviceInfo) -> DeviceInfo | None:
        """`info` if it is to be recovered; None (deleted) if it never started."""
        if info.state == uapi.UBLK_S_DEV_DEAD:
            log.warning("%s: /dev/ublkb%d was never started (a start crashed); deleting it "
                        "and creating the device anew", self.name, info.dev_id)
            self.control.delete_device(info.dev_id)
            return None
        taking_over = self.predecessor is not None and info.pid == self.predecessor.pid
        if info.pid != os.getpid() and server_alive(info.pid) and not taking_over and \
                info.state == uapi.UBLK_S_DEV_LIVE:
            raise DeviceBusyError(
                f"{self.name}: /dev/ublkb{info.dev_id} is LIVE and served by ublkd pid "
                f"{info.pid}; stop it first (`systemctl stop ublkd@{self.name}`)"
            )
        return info

    # -- create ----------------------------------------------------------------
    def create_and_serve(self, previous: DeviceState | None, may_create: bool) -> None:
        with contextlib.ExitStack() as undo:
            backend = open_backend(self.config, may_create=may_create)
            undo.callback(backend.close)
            undo.callback(remove_state, self.name)
            self.info = self.add_device(self.wanted_id(previous), backend)
            undo.callback(self.delete_device)
            self.control.set_params(self.info.dev_id, self.params_for(backend))
            self.save_state(generation=1, created=now())
            undo.callback(self.join_queues)
            self.prepare_queues(backend)
            char_fd = self.open_char_device()
            undo.callback(os.close, char_fd)
            undo.callback(self.join_queues)  # before the close: the queues use it
            self.start_queues(char_fd)
            undo.callback(self.stop_device)
            self.control.start_device(self.info.dev_id, os.getpid())
            log.info("%s: created /dev/ublkb%d (%s backend, %d queue(s) of depth %d, "
                     "recovery %s)", self.name, self.info.dev_id, self.config.backend,
                     self.info.nr_queues, self.info.queue_depth, self.config.recovery)
            self.serve_until_stopped()
            self.hand_over_if_asked(undo, backend)

    def wanted_id(self, previous: DeviceState | None) -> int | None:
        """The configured id; else the id we had before, when it is free again."""
        if self.config.dev_id is not None:
            self.refuse_taken_id(self.config.dev_id)
            return self.config.dev_id
        if previous is not None and not self.id_taken(previous.dev_id):
            return previous.dev_id
        return None

    def id_taken(self, dev_id: int) -> bool:
        try:
            self.control.get_info(dev_id)
        except DeviceNotFoundError:
            return False
        return True

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

    def refuse_unsupported_recovery(self) -> None:
        """A recovery mode the kernel lacks is a configuration error, not a
        silent fallback: the user chose what applications see while no
        daemon runs.  Kernels before GET_FEATURES (6.5) report nothing and
        are taken to have 6.1's recovery; ADD_DEV's answer checks that."""
        mode = self.config.recovery
        supported = self.control.features() or RECOVERY_FLAGS["reissue"]
        missing = [f for f in uapi.FEATURES if RECOVERY_FLAGS[mode] & f.bit & ~supported]
        if missing:
            needs = ", ".join(f"UBLK_F_{f.name} (Linux {f.since})" for f in missing)
            raise ConfigError(
                f"{self.config.source}: recovery = \"{mode}\" needs {needs}, which the "
                f"ublk driver of this kernel ({os.uname().release}) does not have "
                f"(`ublkd features` lists what it has); choose recovery = \"reissue\" or "
                f"\"abort\", or run a newer kernel")

    def copy_flags(self, backend: Backend) -> int:
        """How a file device's data avoids ublkd's buffers (`zero_copy`).

        UBLK_F_AUTO_BUF_REG (6.16+): each request's pages become an io_uring
        fixed buffer that the backing file is read into and written from
        directly, no copy at all.  A file io_uring cannot serve without a
        worker thread per request (tmpfs: no RWF_NOWAIT) gets
        UBLK_F_USER_COPY (6.5+) instead: the queue thread copies between the
        request and the mapped file itself, once, as loop does (the worker
        threads cost more than the copy, docs/performance.md).  Neither
        for NBD, which sends from, or the null backend, which zeroes, a
        buffer of ours: 0, the buffers of NEED_GET_DATA."""
        fast = backend.fast_path()
        if not (self.config.zero_copy and fast is not None and fast.kind == "file"):
            return 0
        features = self.control.features()
        if fast.inline:
            return features & uapi.UBLK_F_USER_COPY
        return features & uapi.UBLK_F_AUTO_BUF_REG

    def add_device(self, dev_id: int | None, backend: Backend) -> DeviceInfo:
        self.refuse_unsupported_recovery()
        queues = backend.queues_for(self.config.queues)
        # NEED_GET_DATA: the queues lend buffers per request instead of one
        # per tag (resident memory ~ requests in flight, docs/performance.md);
        # a device without buffers of ours has no use for it.
        copy = self.copy_flags(backend)
        flags = RECOVERY_FLAGS[self.config.recovery] | (copy or uapi.UBLK_F_NEED_GET_DATA)
        if self.control.ioctl_encode:
            flags |= uapi.UBLK_F_CMD_IOCTL_ENCODE
        if flags & uapi.UBLK_F_USER_RECOVERY and self.control.features() & uapi.UBLK_F_QUIESCE:
            flags |= uapi.UBLK_F_QUIESCE  # hand-overs between requests (hand_over_if_asked)
        info = self.control.add_device(
            dev_id=dev_id,
            nr_queues=queues,
            queue_depth=self.config.queue_depth,
            max_io_buf_bytes=IO_BUFFER_BYTES,
            flags=flags,
            cookie=identity.cookie_of(self.name),
        )
        if info.nr_queues != queues:
            log.warning("%s: the kernel gave %d queue(s) of the %d asked for (one per CPU "
                        "at most)", self.name, info.nr_queues, queues)
        missing = RECOVERY_FLAGS[self.config.recovery] & ~info.flags
        if missing:
            self.control.delete_device(info.dev_id)
            raise KernelError(
                f"{self.name}: this kernel does not support recovery = "
                f"\"{self.config.recovery}\" (ADD_DEV dropped flags {missing:#x}); "
                f"set recovery = \"none\" in {self.config.source} or use a kernel >= 6.1"
            )
        return info

    def params_for(self, backend: Backend) -> Params:
        """The device's parameters, fixed from START_DEV on (recoveries keep them).

        Discard and write-zeroes only when the backend does them (the file
        backend probes its file system): the block layer sends what is
        advertised and logs every request that fails.  Without write-zeroes
        it writes zero pages itself.  The discard part needs a granularity
        as soon as either is advertised.
        """
        cfg = self.config
        discard = backend.supports_discard
        write_zeroes = backend.supports_write_zeroes
        return Params(
            logical_block_size=cfg.logical_block_size,
            physical_block_size=max(cfg.logical_block_size, 4096),
            io_min=cfg.logical_block_size,
            max_sectors=self.info.max_io_buf_bytes >> 9,
            dev_sectors=backend.size >> 9,
            # A volatile cache makes the block layer send FLUSH (the file
            # backend's fdatasync, NBD's flush).
            volatile_cache=backend.volatile_cache,
            read_only=backend.read_only,
            discard_granularity=4096 if discard or write_zeroes else 0,
            max_discard_sectors=(1 << 30) >> 9 if discard else 0,
            max_write_zeroes_sectors=(1 << 30) >> 9 if write_zeroes else 0,
            max_discard_segments=1 if discard else 0,
        )

    # -- recover ---------------------------------------------------------------
    def recover_and_serve(self, previous: DeviceState, info: DeviceInfo) -> None:
        self.info = info
        self.keep_settings_of(previous)
        started = time.monotonic()
        # The old server lets go once our backend and queues are ready; not
        # before a connection of ours that its own could block.
        go_first = connects_to_server(self.config)
        with contextlib.ExitStack() as undo:
            if go_first:
                pause = self.let_the_predecessor_go()
            backend = open_backend(self.config, may_create=False, claim_wait=None)
            undo.callback(backend.close)
            self.check_backend_covers(backend, previous)
            undo.callback(self.join_queues)
            self.prepare_queues(backend)
            if go_first:
                pause.lap("our connection and queues")
            else:
                pause = self.let_the_predecessor_go()
            backend.claim(RECOVERY_WAIT)
            pause.lap("the old server's exit")
            self.start_user_recovery()
            pause.lap("START_USER_RECOVERY")
            char_fd = self.open_char_device()
            undo.callback(os.close, char_fd)
            undo.callback(self.join_queues)  # before the close: the queues use it
            self.start_queues(char_fd)
            self.control.end_user_recovery(info.dev_id, os.getpid())
            pause.lap("FETCH and END_USER_RECOVERY")
            if self.predecessor is not None:
                log.info("%s: /dev/ublkb%d served again %s after the old server was told "
                         "to let go", self.name, info.dev_id, pause)
            # After END, not before: the device's I/O waits for END, not for
            # the state file (a crash before it is written only leaves the
            # previous server's pid and generation in it).
            self.save_state_if_possible(generation=next_generation(previous),
                                        created=previous.created)
            # From here on a stop is a normal stop: the device is ours again.
            undo.pop_all()
            undo.callback(backend.close)
            undo.callback(remove_state, self.name)
            undo.callback(self.delete_device)
            undo.callback(os.close, char_fd)
            undo.callback(self.join_queues)
            undo.callback(self.stop_device)
            log.info("%s: recovered /dev/ublkb%d in %.2f s (recovery %d)", self.name,
                     info.dev_id, time.monotonic() - started, self.state.generation - 1)
            self.serve_until_stopped()
            self.hand_over_if_asked(undo, backend)

    def keep_settings_of(self, previous: DeviceState) -> None:
        """Serve an existing device as it was created, whatever the config says now.

        The kernel keeps the size, block size and flags, and the data is in
        the backing file it was created with.  Refusing an edited config
        here would end, after systemd's restarts, in give-up: deleting a
        device in use over an edit.  The edit applies at the next create.
        """
        kept = DeviceConfig.from_dict(previous.config)
        changed = {key: getattr(kept, key) for key in DEVICE_SHAPING_KEYS
                   if getattr(kept, key) != getattr(self.config, key)}
        if changed:
            log.warning("%s: %s changed in %s since /dev/ublkb%d was created; it is served "
                        "as created until it is created anew (`systemctl stop ublkd@%s`, "
                        "then start)", self.name, ", ".join(changed), self.config.source,
                        previous.dev_id, self.name)
            self.config = dataclasses.replace(self.config, **changed)

    def check_backend_covers(self, backend: Backend, previous: DeviceState) -> None:
        """The device keeps the size it was created with; a backing file now
        smaller would lose every write past its end."""
        size = Params.from_dict(previous.params).size
        if backend.size < size:
            raise ConfigError(
                f"{self.config.source}: /dev/ublkb{previous.dev_id} is {size} bytes, but "
                f"{self.config.path or 'the ' + self.config.backend + ' backend'} has only "
                f"{backend.size}; a running device keeps its size: restore the backing "
                f"file or `size`, then restart ublkd@{self.name}")

    def start_user_recovery(self) -> None:
        """START_USER_RECOVERY, retried while the old server is still going away.

        EINVAL on a QUIESCED device means recovery was already started (an
        earlier attempt died between START and END, before any queue was
        ready again): the kernel is waiting for FETCHes, which we send next.
        """
        dev_id = self.info.dev_id
        started = time.monotonic()
        deadline = started + RECOVERY_WAIT
        announced = False
        while True:
            try:
                self.control.start_user_recovery(dev_id)
                return
            except KernelError as error:
                code = getattr(error, "errno", None)
                state = self.control.get_info(dev_id).state
                if code == errno.EINVAL and state == uapi.UBLK_S_DEV_QUIESCED:
                    log.info("%s: recovery of /dev/ublkb%d was already started; "
                             "continuing it", self.name, dev_id)
                    return
                if code != errno.EBUSY or time.monotonic() > deadline:
                    raise
            if not announced:
                log.info("%s: waiting for the old server of /dev/ublkb%d to go away "
                         "(the kernel must see /dev/ublkc%d closed and the device "
                         "quiesced)", self.name, dev_id, dev_id)
                announced = True
            fast = time.monotonic() - started < FAST_RETRY_SECONDS
            time.sleep(FAST_RETRY if fast else RECOVERY_RETRY)

    # -- serving ---------------------------------------------------------------
    def save_state(self, generation: int, created: str) -> None:
        self.state = DeviceState(
            name=self.name,
            dev_id=self.info.dev_id,
            flags=self.info.flags,
            params=self.control.get_params(self.info.dev_id).to_dict(),
            config=self.config.to_dict(),
            pid=os.getpid(),
            generation=generation,
            created=created,
            updated=now(),
            version=__version__,
        )
        save_state(self.state)

    def save_state_if_possible(self, generation: int, created: str) -> None:
        """save_state for a recovery: a device that holds data is served even when
        its state cannot be written (a full /var); the kernel's cookie still
        identifies it, and the next start writes the state again."""
        try:
            self.save_state(generation, created)
        except StateError as error:
            log.error("%s: %s; serving /dev/ublkb%d all the same", self.name, error,
                      self.info.dev_id)

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
                    raise KernelError(
                        f"{self.name}: {path} did not appear after ADD_DEV") from None
                time.sleep(0.05)

    def prepare_queues(self, backend: Backend) -> None:
        """Start every queue's thread, which makes its ring and backend
        connection and waits for start_queues."""
        fetch_op, commit_op = uapi.io_opcodes(self.control.ioctl_encode)
        together = threading.Barrier(self.info.nr_queues)
        if self.config.poll_us:
            log.info("%s: queues poll for %d us after each completion before they sleep "
                     "(poll_us)", self.name, self.config.poll_us)
        user_copy = self.info.flags & uapi.UBLK_F_USER_COPY
        backing_map = backend.shared_mapping() if user_copy else None
        for q_id in range(self.info.nr_queues):
            queue = Queue(q_id, self.info.queue_depth, self.info.max_io_buf_bytes,
                          backend, fetch_op, commit_op,
                          need_get_data=bool(self.info.flags & uapi.UBLK_F_NEED_GET_DATA),
                          auto_buf_reg=bool(self.info.flags & uapi.UBLK_F_AUTO_BUF_REG),
                          backing_map=backing_map,
                          fetch_together=together, poll_us=self.config.poll_us)
            self.queues.append(queue)
            queue.start()
        for queue in self.queues:
            queue.prepared.wait()
            self.raise_if_failed(queue)

    def start_queues(self, char_fd: int) -> None:
        """Every queue FETCHes its tags on /dev/ublkcN char_fd."""
        for queue in self.queues:
            queue.attach(char_fd)
        for queue in self.queues:
            queue.fetching.wait()
            self.raise_if_failed(queue)

    def raise_if_failed(self, queue: Queue) -> None:
        if queue.error:
            raise KernelError(f"{self.name}: queue {queue.q_id} could not start: {queue.error}")

    def serve_until_stopped(self) -> None:
        """Until SIGTERM/SIGINT/SIGUSR2, pinging the watchdog while every queue's
        loop runs.

        A hung daemon (a queue loop silent) stops the pings: systemd kills
        it and the next one recovers the device.  A slow backend (a long
        fdatasync, a multipath path switch, NFS) does not: the loops still
        run, killing the daemon would not make the backend faster, and the
        restarts would end in give-up.  STATUS says how late the backend is.
        Anything that goes wrong here ends the process like a crash (the
        device is recovered), never like a stop (the device deleted).
        """
        self.notifier.ready(self.status_line("LIVE"))
        self.tell_predecessor_we_serve()
        backing = str(self.config.path) if self.config.path else None
        try:
            self.notifier.ensure_stop_order(self.name, self.info.dev_id, backing)
            while not self.stop.wait(self.notifier.tick) or self.refuse_hand_over():
                self.check_health()
        except Exception:
            log.exception("%s: serving failed", self.name)
            self.end_like_a_crash("serving failed")
        log.info("%s: %s received", self.name, self.stop.names())
        self.handing_over = self.stop.hand_over or self.restart_keeps_device()
        if self.handing_over:
            self.notifier.status(self.status_line("handing over"))
            return
        self.notifier.stopping(self.status_line("stopping"))
        log.info("%s: stopping /dev/ublkb%d", self.name, self.info.dev_id)

    def tell_predecessor_we_serve(self) -> None:
        """A successor is the unit's main process from now on: systemd is told
        (MAINPID= of our main process; NotifyAccess=all lets a worker say
        it), then the old main process, which exits."""
        if self.predecessor is None:
            return
        self.notifier.send(f"MAINPID={os.getppid()}")
        self.predecessor.say(TOOK_OVER)
        self.predecessor.close()
        log.info("%s: took /dev/ublkb%d over from pid %d", self.name, self.info.dev_id,
                 self.predecessor.pid)
        self.predecessor = None

    def refuse_hand_over(self) -> bool:
        """A SIGUSR2 alone (`ublkd upgrade`, or sent by hand) for a device that
        would not survive it is refused, and serving goes on: `ublkd upgrade`
        refuses such devices itself (ublkd/handover.py), this is the daemon's
        own guard."""
        only_hand_over = set(self.stop.signals) == {signal.SIGUSR2}
        loss = hand_over_loss(self.info.flags) if only_hand_over else None
        if loss is None:
            return False
        log.error("%s: hand-over refused, /dev/ublkb%d keeps its daemon: %s", self.name,
                  self.info.dev_id, loss)
        self.stop.forget_hand_over()
        return True

    def restart_keeps_device(self) -> bool:
        """Whether this stop is the first half of a restart (`systemctl restart`,
        needrestart after a library upgrade): then the device is handed over to
        the restarted unit like an upgrade, instead of being deleted under its
        mounts.  Only where the device survives a moment without a server
        (recovery "reissue" or "abort"); with "none" the kernel would delete it
        anyway.  A plain `systemctl stop` still deletes it."""
        if not systemd.restart_pending():
            return False
        if not self.info.flags & uapi.UBLK_F_USER_RECOVERY:
            log.warning("%s: restarted with recovery = \"none\": /dev/ublkb%d cannot "
                        "outlive its server and is deleted", self.name, self.info.dev_id)
            return False
        log.info("%s: the unit is restarting; handing /dev/ublkb%d over to the restarted "
                 "daemon", self.name, self.info.dev_id)
        return True

    def hand_over_if_asked(self, undo: contextlib.ExitStack, backend: Backend) -> None:
        """SIGUSR2: leave the device LIVE-but-serverless to a new process.

        Backend I/O in flight is finished and committed; what the kernel
        hands us after that is left fetched, and the kernel re-issues it
        to the next server (recovery = "reissue": no error for anyone).
        The device, its state file and the backend stay (only what the
        backend claims is let go, Backend.let_go); the unit's restart starts
        the successor, which recovers the device.  The process must exit
        right after (the worker's os._exit): its exit closes every queue's
        ring at once (Queue._stay_until_process_exit).
        """
        if not self.handing_over:
            return
        undo.pop_all()
        self.quiesce_for_hand_over()
        letting_go = time.monotonic()
        for queue in self.queues:
            queue.handover.set()
        for queue in self.queues:
            while queue.alive and not queue.handed_over.wait(0.1):
                pass
        backend.let_go()
        log.info("%s: handed /dev/ublkb%d over (the queues let go in %.0f ms); the next "
                 "ublkd recovers it", self.name, self.info.dev_id,
                 (time.monotonic() - letting_go) * 1000)

    def quiesce_for_hand_over(self) -> None:
        """On a device made with UBLK_F_QUIESCE (6.16+), QUIESCE_DEV first: the
        kernel stops handing out requests and holds new ones itself, so the
        queues finish what they have and nothing is left fetched for the
        successor to re-issue.  That is what lets a recovery = "abort" device
        be handed over too (ublkd/handover.py).  A failed QUIESCE_DEV (EBUSY:
        a queue busy for all of QUIESCE_TIMEOUT_MS) still left the kernel
        holding new requests; the hand-over goes on as without it."""
        if not self.info.flags & uapi.UBLK_F_QUIESCE:
            return
        started = time.monotonic()
        try:
            self.control.quiesce_device(self.info.dev_id, QUIESCE_TIMEOUT_MS)
        except UblkdError as error:
            log.warning("%s: %s; handing /dev/ublkb%d over without it", self.name, error,
                        self.info.dev_id)
            return
        log.info("%s: /dev/ublkb%d quiesced in %.0f ms: new requests wait in the kernel",
                 self.name, self.info.dev_id, (time.monotonic() - started) * 1000)

    def check_health(self) -> None:
        """One watchdog tick: ping if every queue loop runs; STATUS and the journal
        say when the backend is late and when it answers again."""
        hung = self.hung_queue()
        if hung is not None:
            log.error("%s: %s; not pinging the watchdog", self.name, hung)
            self.notifier.status(self.status_line(f"unhealthy: {hung}"))
            return
        self.notifier.watchdog()
        late = self.late_backend()
        if late == self.backend_late:
            return
        if late is None:
            log.info("%s: the backend answers again", self.name)
            self.notifier.status(self.status_line("LIVE"))
        elif self.backend_late is None:
            log.warning("%s: %s; waiting for it (the daemon itself is fine)", self.name, late)
        if late is not None:
            self.notifier.status(self.status_line(f"LIVE, {late}"))
        self.backend_late = late

    def hung_queue(self) -> str | None:
        """Why a queue does not serve, or None.  A queue thread that ended is
        beyond repair in this process: end it like a crash."""
        moment = time.monotonic()
        for queue in self.queues:
            if not queue.alive:
                self.end_like_a_crash(f"queue {queue.q_id} stopped serving: {queue.error}")
            if moment - queue.heartbeat > QUEUE_SILENCE_LIMIT:
                return f"queue {queue.q_id} loop silent for {moment - queue.heartbeat:.0f} s"
        return None

    def late_backend(self) -> str | None:
        """How late the backend is, in whole stall limits (so STATUS changes
        seldom), or None when no request waits longer than one."""
        lost = self.lost_backend()
        if lost is not None:
            return lost
        moment = time.monotonic()
        limit = self.notifier.stall_limit
        oldest = min((since for queue in self.queues
                      if (since := queue.stalled_since()) is not None), default=moment)
        if moment - oldest <= limit:
            return None
        seconds = int((moment - oldest) // limit * limit)
        if self.config.backend == "rbd":
            return (f"degraded: the Ceph cluster has not answered I/O for over {seconds} s "
                    f"(librbd retries{self.io_timeout_clause()})")
        return f"backend I/O unanswered for over {seconds} s"

    def io_timeout_clause(self) -> str:
        timeout = self.config.io_timeout
        return f"; EIO after io_timeout = {timeout:g} s" if timeout else ""

    def lost_backend(self) -> str | None:
        """What the queues say while their NBD server is gone, or None."""
        states = [state for queue in self.queues if (state := queue.backend_lost())]
        if not states:
            return None
        seconds = int((time.monotonic() - min(since for since, _, _ in states)) // 5 * 5)
        if any(failing for _, _, failing in states):
            what = "I/O fails with EIO until it is back"
        else:
            what = f"{sum(held for _, held, _ in states)} request(s) waiting"
        return f"reconnecting to {self.config.uri} for over {seconds} s ({what})"

    def end_like_a_crash(self, why: str) -> NoReturn:
        """Leave the device to the next worker, as a crash would: the kernel
        quiesces it when this process's rings close, and the supervisor (or
        systemd's restart) starts a worker that recovers it.  Deleting it
        instead would fail the I/O of everything using it."""
        log.error("%s: %s; ending this worker so that a new one recovers /dev/ublkb%d",
                  self.name, why, self.info.dev_id)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(EXIT_SIGNALLED_BASE + signal.SIGKILL)  # not reached: kill() does not return

    def status_line(self, state: str) -> str:
        recoveries = self.state.generation - 1 if self.state else 0
        return (f"/dev/ublkb{self.info.dev_id} {state}, {self.config.backend} backend, "
                f"recovered {recoveries} time{'s' if recoveries != 1 else ''}")

    # -- undo steps ------------------------------------------------------------
    def stop_device(self) -> None:
        for queue in self.queues:
            queue.fail_waiting_io()
        with contextlib.suppress(DeviceNotFoundError):
            self.control.stop_device(self.info.dev_id)

    def join_queues(self) -> None:
        """After STOP_DEV every fetched tag ends with ABORT and the threads end;
        a device that never started needs them told."""
        for queue in self.queues:
            queue.leave()
        for queue in self.queues:
            queue.join()
        self.queues = []

    def delete_device(self) -> None:
        with contextlib.suppress(DeviceNotFoundError):
            if not self.control.delete_device(self.info.dev_id):
                log.warning("%s: /dev/ublkb%d is deleted, but something still holds it "
                            "(a file system still mounted?): its I/O fails, and its number "
                            "is taken until that lets go", self.name, self.info.dev_id)


def serve(config: DeviceConfig, notifier: Notifier, config_error: ConfigError | None = None,
          predecessor: Predecessor | None = None) -> int:
    """Create or recover the device `config` describes (or take it over from
    `predecessor`); serve it until SIGTERM/SIGINT (returns 0) or SIGUSR2
    (hands it over, returns EXIT_HANDED_OVER)."""
    require_root()
    faulthandler.enable()  # SIGABRT from the watchdog prints every thread's stack
    with contextlib.closing(ControlDevice()) as control:
        device = Device(config, control, notifier, config_error, predecessor)
        device.stop.listen((signal.SIGTERM, signal.SIGINT, signal.SIGUSR2))
        return device.run()


def config_for_serving(name: str) -> tuple[DeviceConfig, ConfigError | None]:
    """/etc/ublkd/NAME.toml; when it is wrong (a typo, a missing file) but the
    device has a state file, the configuration kept there and the error:
    an existing device must not be left unrecovered over an edit."""
    try:
        return load_config(name), None
    except ConfigError as error:
        try:
            previous = load_state(name)
        except StateError:
            previous = None
        if previous is None:
            raise
        return DeviceConfig.from_dict(previous.config), error


def recover(config: DeviceConfig) -> int:
    """`ublkd recover NAME`: the START_USER_RECOVERY step alone, for a manual
    recovery; the next `ublkd serve NAME` finishes it.  Returns the dev id."""
    require_root()
    with contextlib.closing(ControlDevice()) as control:
        device = Device(config, control, Notifier())
        _, info, _ = device.find_device()
        if info is None:
            raise DeviceNotFoundError(f"{config.name}: it has no device to recover; "
                                      f"`systemctl start ublkd@{config.name}` creates it anew")
        device.info = info
        device.start_user_recovery()
    return info.dev_id


def give_up(name: str, force_delete: bool = False) -> str:
    """What systemd's OnFailure runs once it stopped restarting ublkd@NAME.

    on_give_up = "delete": STOP_DEV + DEL_DEV, so queued I/O fails and
    nothing waits forever (a shutdown would otherwise hang on the mount).
    on_give_up = "keep": leave the device quiesced for a manual recovery.
    """
    require_root()
    with contextlib.closing(ControlDevice()) as control:
        info, config, why_not = unserved_device(control, name)
        if info is None:
            return f"{name}: {why_not}"
        policy = "delete" if force_delete or config is None else config.on_give_up
        if policy == "keep":
            return (f"{name}: systemd gave up restarting ublkd@{name}; /dev/ublkb{info.dev_id} "
                    f"is kept ({info.state_name}), its I/O waits. Fix the cause, then "
                    f"`systemctl start ublkd-recover@{name}`, or `ublkd delete {name}`")
        remove_device(control, name, info)
    why = "on_give_up = \"delete\"" if config is not None else "its on_give_up is unknown"
    return (f"{name}: systemd gave up restarting ublkd@{name}; /dev/ublkb{info.dev_id} "
            f"deleted ({why}), its pending I/O failed")


def after_stop(name: str, service_result: str, exit_code: str, exit_status: str) -> str:
    """ExecStopPost= of ublkd@NAME: a stop never leaves the device waiting for
    a daemon that is not coming.

    The daemon deletes its device when SIGTERM reaches its serving loop.
    A stop that lands earlier (while a restarted daemon starts or recovers:
    Python dies of SIGTERM before its handlers exist) would leave the device
    quiesced with its I/O queued and nobody to serve it: every reader, and
    the shutdown, would hang.  So after a stop, the device is deleted here
    unless a daemon serves it.  Not after a crash (systemd restarts the
    unit, whose daemon recovers it), a hand-over (exit 75) or the stop half
    of a restart: there the device is waited for.  The arguments are
    systemd's $SERVICE_RESULT, $EXIT_CODE and $EXIT_STATUS.
    """
    require_root()
    if service_result != "success":
        return f"{name}: the unit ended with {service_result}; its restart or give-up decides"
    if exit_code == "exited" and exit_status == str(EXIT_HANDED_OVER):
        return f"{name}: handed over; the next daemon recovers the device"
    if systemd.restart_pending():
        return f"{name}: restarting; the next daemon recovers the device"
    with contextlib.closing(ControlDevice()) as control:
        info, _, why_not = unserved_device(control, name)
        if info is None:
            return f"{name}: stopped; {why_not}"
        remove_device(control, name, info)
    return (f"{name}: stopped before a daemon served /dev/ublkb{info.dev_id} again "
            f"({info.state_name}); deleted it so that its queued I/O fails instead of "
            f"waiting for a daemon that is not coming")


def delete(name: str | None, dev_id: int | None = None) -> str:
    """`ublkd delete NAME` (or `--id N`): STOP_DEV + DEL_DEV of a device no daemon
    serves, and removal of its state file."""
    require_root()
    with contextlib.closing(ControlDevice()) as control:
        if name is None:
            info = identity.info_or_none(control, dev_id)
            if info is None:
                raise DeviceNotFoundError(f"there is no /dev/ublkb{dev_id}")
        else:
            info, _, had_state = find_for_removal(control, name)
            if info is None and not had_state:
                raise DeviceNotFoundError(f"{name}: ublkd has no state and the kernel no "
                                          f"device for it; nothing to delete")
            if info is None:
                remove_state(name)
                return f"{name}: its device was already gone; state removed"
        if server_alive(info.pid):
            raise DeviceBusyError(
                f"/dev/ublkb{info.dev_id} is served by ublkd pid {info.pid}; stop it with "
                f"`systemctl stop ublkd@{name or 'NAME'}` (or SIGTERM)")
        remove_device(control, name, info)
    if name is None:
        return f"/dev/ublkb{info.dev_id} deleted"
    return f"{name}: /dev/ublkb{info.dev_id} deleted, state removed"


def unserved_device(control: ControlDevice, name: str
                    ) -> tuple[DeviceInfo | None, DeviceConfig | None, str]:
    """(device `name`'s kernel device if no daemon serves it, else None; its
    config as far as known; why there is nothing to remove).  The state of a
    device that is gone is forgotten on the way."""
    info, config, _ = find_for_removal(control, name)
    if info is None:
        remove_state(name)
        return None, config, "it has no device in the kernel; nothing to do"
    if server_alive(info.pid) and info.state == uapi.UBLK_S_DEV_LIVE:
        return None, config, (f"/dev/ublkb{info.dev_id} is served (pid {info.pid}); "
                              f"nothing to do")
    return info, config, ""


def remove_device(control: ControlDevice, name: str | None, info: DeviceInfo) -> None:
    """STOP_DEV + DEL_DEV (queued I/O fails), then forget device `name`'s state
    (none to forget for a device found by its id alone)."""
    control.stop_device(info.dev_id)
    control.delete_device(info.dev_id)
    if name is not None:
        remove_state(name)


def find_for_removal(control: ControlDevice, name: str
                     ) -> tuple[DeviceInfo | None, DeviceConfig | None, bool]:
    """(device `name`'s kernel device or None, the config it was created with as
    far as known, whether it has a state file), whatever shape its state file
    and config are in: give-up and delete must still find the device, or its
    queued I/O would wait forever."""
    had_state = True
    try:
        previous = load_state(name)
        had_state = previous is not None
    except StateError as error:
        log.error("%s: %s; looking for its device by its cookie", name, error)
        previous = None
    config = DeviceConfig.from_dict(previous.config) if previous else config_or_none(name)
    pinned_id = config.dev_id if config else None
    return identity.find_device(control, name, previous, pinned_id), config, had_state


def config_or_none(name: str) -> DeviceConfig | None:
    """/etc/ublkd/NAME.toml, or None (logged) when it is missing or wrong."""
    try:
        return load_config(name)
    except UblkdError as error:
        log.warning("%s: %s", name, error)
        return None
