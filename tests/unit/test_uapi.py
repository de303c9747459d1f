"""uapi.py against the kernel's own header: layouts and numbers.

The host's <linux/ublk_cmd.h> (linux-libc-dev) is compiled into a tiny C
program that prints what it defines; whatever it lacks (the host has the
6.1 header) is checked against numbers copied from the 6.12 header below.
The program adapts to newer headers through the feature macros they add.
"""

from __future__ import annotations

import ctypes
import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from ublkd.kernel import uapi

HOST_HEADER = Path("/usr/include/linux/ublk_cmd.h")

STRUCTS = [
    uapi.ublksrv_ctrl_cmd,
    uapi.ublksrv_ctrl_dev_info,
    uapi.ublksrv_io_desc,
    uapi.ublksrv_io_cmd,
    uapi.ublk_param_basic,
    uapi.ublk_param_discard,
    uapi.ublk_param_devt,
    uapi.ublk_param_zoned,
    uapi.ublk_params,
]

# Parts of the ABI that came after 6.1, with the header macro that marks
# their arrival: the C program asks about them only when that macro exists.
NEWER_FIELDS = {
    ("ublksrv_ctrl_cmd", "dev_path_len"): "UBLK_F_UNPRIVILEGED_DEV",
    ("ublksrv_ctrl_cmd", "pad"): "UBLK_F_UNPRIVILEGED_DEV",
    ("ublksrv_ctrl_cmd", "reserved"): "UBLK_F_UNPRIVILEGED_DEV",
    ("ublksrv_ctrl_dev_info", "owner_uid"): "UBLK_F_UNPRIVILEGED_DEV",
    ("ublksrv_ctrl_dev_info", "owner_gid"): "UBLK_F_UNPRIVILEGED_DEV",
    ("ublk_params", "devt"): "UBLK_PARAM_TYPE_DEVT",
    ("ublk_params", "zoned"): "UBLK_PARAM_TYPE_ZONED",
}
NEWER_STRUCTS = {
    "ublk_param_devt": "UBLK_PARAM_TYPE_DEVT",
    "ublk_param_zoned": "UBLK_PARAM_TYPE_ZONED",
}
# Ours only: never in any header.
NOT_IN_HEADER = {"UBLK_IO_OP_MASK", "UBLK_QID_BITS"}

# From include/uapi/linux/ublk_cmd.h of Linux 6.12 (and the BTF of the test
# bed's 6.12.117 ublk_drv): what the 6.1 header does not have.
LINUX_6_12 = {
    "sizeof": {
        "ublksrv_ctrl_cmd": 32, "ublksrv_ctrl_dev_info": 64, "ublksrv_io_desc": 24,
        "ublksrv_io_cmd": 16, "ublk_param_basic": 32, "ublk_param_discard": 20,
        "ublk_param_devt": 16, "ublk_param_zoned": 32, "ublk_params": 112,
    },
    "offsetof": {
        ("ublksrv_ctrl_cmd", "dev_path_len"): 24,
        ("ublksrv_ctrl_cmd", "pad"): 26,
        ("ublksrv_ctrl_cmd", "reserved"): 28,
        ("ublksrv_ctrl_dev_info", "owner_uid"): 40,
        ("ublksrv_ctrl_dev_info", "owner_gid"): 44,
        ("ublksrv_ctrl_dev_info", "reserved1"): 48,
        ("ublksrv_ctrl_dev_info", "reserved2"): 56,
        ("ublk_param_devt", "disk_minor"): 12,
        ("ublk_param_zoned", "max_zone_append_sectors"): 8,
        ("ublk_param_zoned", "reserved"): 12,
        ("ublk_params", "devt"): 60,
        ("ublk_params", "zoned"): 76,
    },
    "constants": {
        "UBLK_CMD_GET_DEV_INFO2": 0x12,
        "UBLK_U_CMD_GET_QUEUE_AFFINITY": 0x80207501,
        "UBLK_U_CMD_GET_DEV_INFO": 0x80207502,
        "UBLK_U_CMD_ADD_DEV": 0xC0207504,
        "UBLK_U_CMD_DEL_DEV": 0xC0207505,
        "UBLK_U_CMD_START_DEV": 0xC0207506,
        "UBLK_U_CMD_STOP_DEV": 0xC0207507,
        "UBLK_U_CMD_SET_PARAMS": 0xC0207508,
        "UBLK_U_CMD_GET_PARAMS": 0x80207509,
        "UBLK_U_CMD_START_USER_RECOVERY": 0xC0207510,
        "UBLK_U_CMD_END_USER_RECOVERY": 0xC0207511,
        "UBLK_U_CMD_GET_DEV_INFO2": 0x80207512,
        "UBLK_U_CMD_GET_FEATURES": 0x80207513,
        "UBLK_U_CMD_DEL_DEV_ASYNC": 0x80207514,
        "UBLK_FEATURES_LEN": 8,
        "UBLK_U_IO_FETCH_REQ": 0xC0107520,
        "UBLK_U_IO_COMMIT_AND_FETCH_REQ": 0xC0107521,
        "UBLK_U_IO_NEED_GET_DATA": 0xC0107522,
        "UBLK_MAX_NR_QUEUES": 4096,
        "UBLK_F_UNPRIVILEGED_DEV": 1 << 5,
        "UBLK_F_CMD_IOCTL_ENCODE": 1 << 6,
        "UBLK_F_USER_COPY": 1 << 7,
        "UBLK_F_ZONED": 1 << 8,
        "UBLK_IO_OP_ZONE_OPEN": 10,
        "UBLK_IO_OP_ZONE_CLOSE": 11,
        "UBLK_IO_OP_ZONE_FINISH": 12,
        "UBLK_IO_OP_ZONE_APPEND": 13,
        "UBLK_IO_OP_ZONE_RESET_ALL": 14,
        "UBLK_IO_OP_ZONE_RESET": 15,
        "UBLK_IO_OP_REPORT_ZONES": 18,
        "UBLK_PARAM_TYPE_DEVT": 1 << 2,
        "UBLK_PARAM_TYPE_ZONED": 1 << 3,
        # 6.13, after the test bed's kernel:
        "UBLK_F_USER_RECOVERY_FAIL_IO": 1 << 9,
        "UBLK_S_DEV_FAIL_IO": 3,
        # 6.16-6.17, from the header of the test bed's second kernel (6.18):
        "UBLK_F_UPDATE_SIZE": 1 << 10,
        "UBLK_F_AUTO_BUF_REG": 1 << 11,
        "UBLK_F_QUIESCE": 1 << 12,
        "UBLK_F_PER_IO_DAEMON": 1 << 13,
        "UBLK_F_BUF_REG_OFF_DAEMON": 1 << 14,
        "UBLK_U_CMD_QUIESCE_DEV": 0xC0207516,
    },
}


def uapi_constants() -> dict[str, int]:
    """Every UBLK* integer constant uapi.py defines."""
    return {
        name: value for name, value in vars(uapi).items()
        if name.startswith("UBLK") and isinstance(value, int) and name not in NOT_IN_HEADER
    }


def c_program() -> str:
    """C source printing 'sizeof S n', 'offsetof S F n' and 'const NAME n' lines."""
    lines = [
        "#include <errno.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/ioctl.h>",
        "#include <linux/ublk_cmd.h>",
        "int main(void) {",
    ]
    for struct in STRUCTS:
        name = struct.__name__
        body = [f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));']
        for field_name, *_ in struct._fields_:
            stmt = (f'printf("offsetof {name} {field_name} %zu\\n", '
                    f"offsetof(struct {name}, {field_name}));")
            guard = NEWER_FIELDS.get((name, field_name))
            body += [f"#ifdef {guard}", stmt, "#endif"] if guard else [stmt]
        guard = NEWER_STRUCTS.get(name)
        lines += [f"#ifdef {guard}", *body, "#endif"] if guard else body
    for name in uapi_constants():
        lines += [f"#ifdef {name}",
                  f'printf("const {name} %lld\\n", (long long)({name}));', "#endif"]
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def host_header(tmp_path_factory) -> dict:
    """What the host's ublk_cmd.h says, compiled and run."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    if not HOST_HEADER.exists():
        pytest.fail(f"{HOST_HEADER} is missing: apt-get install linux-libc-dev")
    work = tmp_path_factory.mktemp("uapi")
    (work / "probe.c").write_text(c_program())
    subprocess.run([gcc, "-Wall", "-Werror", "-o", str(work / "probe"), str(work / "probe.c")],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    found: dict = {"sizeof": {}, "offsetof": {}, "constants": {}}
    for line in out.splitlines():
        kind, *key, value = line.split()
        if kind == "sizeof":
            found["sizeof"][key[0]] = int(value)
        elif kind == "offsetof":
            found["offsetof"][tuple(key)] = int(value)
        else:
            found["constants"][key[0]] = int(value)
    return found


def our_offset(struct_name: str, field_name: str) -> int:
    return getattr(getattr(uapi, struct_name), field_name).offset


def test_struct_offsets_match_host_header(host_header):
    assert host_header["offsetof"], "the probe printed no offsets"
    for (struct_name, field_name), offset in host_header["offsetof"].items():
        assert our_offset(struct_name, field_name) == offset, (struct_name, field_name)


def test_struct_sizes_match_host_header(host_header):
    sizes = host_header["sizeof"]
    for struct in STRUCTS:
        name = struct.__name__
        if name not in sizes:
            continue
        expected = sizes[name]
        if name == "ublk_params" and "UBLK_PARAM_TYPE_ZONED" not in host_header["constants"]:
            # An older header's ublk_params is our prefix up to the first
            # part it lacks, padded to 8 bytes.
            first_missing = ("devt" if "UBLK_PARAM_TYPE_DEVT" not in host_header["constants"]
                             else "zoned")
            assert expected == -(-our_offset(name, first_missing) // 8) * 8
        else:
            assert ctypes.sizeof(struct) == expected, name


def test_constants_match_host_header(host_header):
    ours = uapi_constants()
    for name, value in host_header["constants"].items():
        assert ours[name] == value, name
    # The 6.1 header's numbers must all be there.
    for name in ("UBLK_CMD_ADD_DEV", "UBLK_IO_FETCH_REQ", "UBLK_F_USER_RECOVERY_REISSUE",
                 "UBLK_IO_RES_ABORT", "UBLK_IO_OP_WRITE_ZEROES", "UBLK_PARAM_TYPE_DISCARD",
                 "UBLK_S_DEV_QUIESCED", "UBLK_MAX_QUEUE_DEPTH", "UBLKSRV_IO_BUF_OFFSET"):
        assert name in host_header["constants"], name


def test_everything_is_checked_against_a_header(host_header):
    """Each constant and field is in the host header or in the 6.12 table."""
    for name in uapi_constants():
        assert name in host_header["constants"] or name in LINUX_6_12["constants"], name
    for struct in STRUCTS:
        for field_name, *_ in struct._fields_:
            key = (struct.__name__, field_name)
            assert key in host_header["offsetof"] or key in LINUX_6_12["offsetof"] or (
                struct.__name__ in NEWER_STRUCTS), key


def test_layouts_match_linux_6_12():
    for struct in STRUCTS:
        assert ctypes.sizeof(struct) == LINUX_6_12["sizeof"][struct.__name__], struct.__name__
    for (struct_name, field_name), offset in LINUX_6_12["offsetof"].items():
        assert our_offset(struct_name, field_name) == offset, (struct_name, field_name)


def test_constants_match_linux_6_12():
    ours = uapi_constants()
    for name, value in LINUX_6_12["constants"].items():
        assert ours[name] == value, name


def test_io_ops_and_results():
    assert [uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_FLUSH,
            uapi.UBLK_IO_OP_DISCARD, uapi.UBLK_IO_OP_WRITE_SAME,
            uapi.UBLK_IO_OP_WRITE_ZEROES] == [0, 1, 2, 3, 4, 5]
    assert uapi.UBLK_IO_RES_ABORT == -errno.ENODEV


def test_opcode_sets_agree_on_the_command_numbers():
    legacy, ioctl = uapi.opcodes(False), uapi.opcodes(True)
    assert legacy.add_dev == 0x04 and ioctl.add_dev == 0xC0207504
    assert ioctl.fetch_req == 0xC0107520 and legacy.commit_and_fetch_req == 0x21
    for name in legacy.__dataclass_fields__:
        if getattr(legacy, name) is not None:  # else a command in ioctl form only
            assert uapi.ioc_nr(getattr(legacy, name)) == uapi.ioc_nr(getattr(ioctl, name)), name
    assert legacy.get_features == ioctl.get_features == uapi.UBLK_U_CMD_GET_FEATURES
    assert legacy.del_dev_async is None and ioctl.del_dev_async == 0x80207514
    assert uapi.io_opcodes(True) == (0xC0107520, 0xC0107521)
    assert uapi.io_opcodes(False) == (0x20, 0x21)


def test_descriptor_mmap_geometry():
    page = uapi.PAGE_SIZE
    assert uapi.descriptor_offset(0) == 0
    # Each queue's slot is sized for 4096 descriptors, whatever the depth.
    assert uapi.descriptor_offset(3) == 3 * -(-4096 * 24 // page) * page
    assert uapi.descriptor_length(64) == page  # 1536 bytes, one page
    assert uapi.descriptor_length(4096) == -(-4096 * 24 // page) * page
    assert uapi.descriptor_length(171) == -(-171 * 24 // page) * page


def test_feature_names():
    flags = uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_CMD_IOCTL_ENCODE | (1 << 40)
    assert uapi.feature_names(flags) == ["USER_RECOVERY", "CMD_IOCTL_ENCODE", hex(1 << 40)]
    assert uapi.STATE_NAMES[uapi.UBLK_S_DEV_QUIESCED] == "QUIESCED"
