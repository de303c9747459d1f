"""Control commands against the guest's real ublk driver (no queues: no START_DEV)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from ublkd.kernel import uapi

CHECKOUT = Path(__file__).resolve().parents[2]

# Ids far from the ones the kernel hands out first, so that devices other
# tests left behind cannot collide with them.
FIXED_ID = 777

PRELUDE = """\
import json
from ublkd.errors import DeviceNotFoundError, KernelError
from ublkd.kernel import uapi
from ublkd.kernel.control import ControlDevice, Params

def gone(control, dev_id):
    try:
        control.get_info(dev_id)
    except DeviceNotFoundError as exc:
        return str(exc)
    return None
"""


def run_in_guest(guest, body: str) -> dict:
    """Run PRELUDE + body with the venv's python in the guest; body prints one JSON line."""
    code = PRELUDE + textwrap.dedent(body)
    out = guest.run([sys.executable, "-c", code], cwd=str(CHECKOUT)).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_add_set_get_params_delete(guest):
    out = run_in_guest(guest, """
        with ControlDevice() as control:
            flags = uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
            info = control.add_device(None, 1, 64, 512 << 10, flags)
            try:
                sent = Params(dev_sectors=(64 << 20) >> 9, logical_block_size=512,
                              physical_block_size=512, max_sectors=(512 << 10) >> 9)
                control.set_params(info.dev_id, sent)
                got = control.get_params(info.dev_id)
                after = control.get_info(info.dev_id)
            finally:
                control.delete_device(info.dev_id)
            print(json.dumps(dict(
                features=control.features(), ioctl_encode=control.ioctl_encode,
                dev_id=info.dev_id, flags=info.flags, nr_queues=info.nr_queues,
                queue_depth=info.queue_depth, state=after.state_name,
                params_equal=got == sent, size=got.size, char_major=got.char_major,
                disk_major=got.disk_major, gone=gone(control, info.dev_id))))
    """)
    assert out["features"] & uapi.UBLK_F_USER_RECOVERY_REISSUE
    assert out["ioctl_encode"] is True  # 6.12 reports CMD_IOCTL_ENCODE
    recovery = uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
    assert out["flags"] & recovery == recovery
    assert (out["nr_queues"], out["queue_depth"]) == (1, 64)
    assert out["params_equal"] is True
    assert out["size"] == 64 << 20
    assert out["char_major"] > 0 and out["disk_major"] == 0  # no disk before START_DEV
    assert out["state"] == "DEAD"
    assert out["gone"] and f"/dev/ublkc{out['dev_id']}" in out["gone"]


def test_unknown_device_is_device_not_found(guest):
    out = run_in_guest(guest, """
        with ControlDevice() as control:
            print(json.dumps(dict(message=gone(control, 99999))))
    """)
    assert out["message"] and "99999" in out["message"] and "ENODEV" in out["message"]


def test_fixed_id_and_duplicate_id(guest):
    out = run_in_guest(guest, f"""
        with ControlDevice() as control:
            info = control.add_device({FIXED_ID}, 1, 32, 256 << 10, 0)
            try:
                control.add_device({FIXED_ID}, 1, 32, 256 << 10, 0)
                duplicate = None
            except KernelError as exc:
                duplicate = dict(message=str(exc), errno=exc.errno)
            finally:
                control.delete_device({FIXED_ID})
            print(json.dumps(dict(dev_id=info.dev_id, duplicate=duplicate,
                                  gone=gone(control, {FIXED_ID}))))
    """)
    assert out["dev_id"] == FIXED_ID
    assert out["duplicate"], "the second ADD_DEV with the same id succeeded"
    assert "EEXIST" in out["duplicate"]["message"] and "ADD_DEV" in out["duplicate"]["message"]
    assert out["gone"]

