"""The device cookie: what the kernel keeps for ublkd to recognise its devices."""

import os

from ublkd.identity import COOKIE_TAG, TAG_MASK, cookie_of, process_exists


def test_cookie_is_tagged_and_fits_the_kernel_field():
    cookie = cookie_of("vol0")
    assert cookie & TAG_MASK == COOKIE_TAG and 0 < cookie < 1 << 64


def test_cookie_depends_on_the_name_only():
    assert cookie_of("vol0") == cookie_of("vol0")
    names = ["vol0", "vol1", "vol-0", "vol\\x2d0", "a", "b" * 200]
    assert len({cookie_of(name) for name in names}) == len(names)


def test_cookie_never_changes_between_versions():
    # Devices outlive daemons and upgrades: a new hash would orphan every
    # device that an older ublkd created.
    assert cookie_of("vol0") == 0x75b12700e383e760


def test_cookie_hash_is_fnv1a_folded_to_48_bits():
    # The published FNV-1a 64-bit value of "a" (draft-eastlake-fnv):
    # another implementation of the cookie (a tool, a rewrite) can check itself.
    fnv = 0xAF63DC4C8601EC8C
    assert cookie_of("a") == COOKIE_TAG | ((fnv >> 48) ^ (fnv & ((1 << 48) - 1)))


def test_a_running_process_is_told_from_a_gone_one():
    assert process_exists(os.getpid())
    assert not process_exists(0) and not process_exists(-1)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert not process_exists(child)
