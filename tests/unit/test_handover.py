"""Which devices `ublkd upgrade` hands over: decided from the kernel's flags."""

from __future__ import annotations

import pytest

from ublkd import handover
from ublkd.errors import DeviceNotFoundError, HandOverRefusedError
from ublkd.kernel import uapi
from ublkd.kernel.control import DeviceInfo
from ublkd.state import DeviceState

# Flags the kernel reports besides the recovery ones (ADD_DEV's others).
OTHER_FLAGS = uapi.UBLK_F_NEED_GET_DATA | uapi.UBLK_F_CMD_IOCTL_ENCODE


@pytest.mark.parametrize("mode", handover.RECOVERY_FLAGS)
def test_recovery_mode_is_read_back_from_the_flags_ublkd_creates(mode):
    assert handover.recovery_mode(handover.RECOVERY_FLAGS[mode] | OTHER_FLAGS) == mode


def test_only_reissue_survives_a_hand_over():
    assert handover.hand_over_loss(handover.RECOVERY_FLAGS["reissue"] | OTHER_FLAGS) is None
    assert "EIO" in handover.hand_over_loss(handover.RECOVERY_FLAGS["abort"])
    assert "removes its disk" in handover.hand_over_loss(OTHER_FLAGS)


def test_flags_ublkd_never_creates_are_not_handed_over():
    flags = uapi.UBLK_F_USER_RECOVERY_REISSUE | uapi.UBLK_F_USER_RECOVERY_FAIL_IO
    assert handover.recovery_mode(flags) is None
    assert handover.hand_over_loss(flags) == (
        "its recovery flags 0x210 are not ublkd's, and only \"reissue\" survives a hand-over")


def test_fail_io_is_never_handed_over_and_abort_only_when_quiesced():
    fail_io = handover.RECOVERY_FLAGS["fail_io"]
    abort = handover.RECOVERY_FLAGS["abort"]
    assert handover.recovery_mode(fail_io) == "fail_io"
    assert "fails every request" in handover.hand_over_loss(fail_io | uapi.UBLK_F_QUIESCE)
    assert "fails the requests its daemon holds" in handover.hand_over_loss(abort)
    assert handover.hand_over_loss(abort | uapi.UBLK_F_QUIESCE) is None


class FakeControl:
    def close(self) -> None:
        pass


def state_of(mode: str) -> DeviceState:
    return DeviceState(name="nr", dev_id=3, flags=handover.RECOVERY_FLAGS[mode], params={},
                       config={"source": "/etc/ublkd/nr.toml", "recovery": mode}, pid=42,
                       generation=1, created="", updated="", version="0.1.0")


def with_kernel_device(monkeypatch, info: DeviceInfo | None) -> None:
    monkeypatch.setattr(handover, "ControlDevice", FakeControl)
    monkeypatch.setattr(handover.identity, "find_device",
                        lambda control, name, state, pinned: info)


def kernel_info(flags: int) -> DeviceInfo:
    return DeviceInfo(dev_id=3, nr_queues=1, queue_depth=128, state=uapi.UBLK_S_DEV_LIVE,
                      max_io_buf_bytes=1 << 19, pid=42, flags=flags)


def test_the_kernels_flags_decide_not_the_state_or_config(monkeypatch):
    # Created with "none"; the state and config say "reissue" (edited since).
    with_kernel_device(monkeypatch, kernel_info(OTHER_FLAGS))
    with pytest.raises(HandOverRefusedError) as caught:
        handover.refuse_if_lost("nr", state_of("reissue"))
    assert caught.value.exit_code == 9
    message = str(caught.value)
    assert message.startswith('nr: not handed over: /dev/ublkb3 was created with recovery = '
                              '"none", and the kernel removes its disk'), message
    assert "stays with ublkd 0.1.0 (pid 42) until its next planned restart" in message
    assert 'recovery = "reissue" in /etc/ublkd/nr.toml' in message


def test_a_reissue_device_is_handed_over(monkeypatch):
    info = kernel_info(handover.RECOVERY_FLAGS["reissue"] | OTHER_FLAGS)
    with_kernel_device(monkeypatch, info)
    assert handover.refuse_if_lost("nr", state_of("reissue")) == info


def test_no_kernel_device_is_nothing_to_hand_over(monkeypatch):
    with_kernel_device(monkeypatch, None)
    with pytest.raises(DeviceNotFoundError, match="nr: the kernel has no device for it"):
        handover.refuse_if_lost("nr", state_of("reissue"))
