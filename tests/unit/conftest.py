"""Fixtures of the host-only tests: a queue loop's char device, backing file
and harness (tests/unit/queue_harness.py)."""

from __future__ import annotations

import os

import pytest

from tests.unit.queue_harness import Harness


@pytest.fixture
def files(tmp_path):
    char = os.open(tmp_path / "ublkc", os.O_RDWR | os.O_CREAT, 0o600)
    backing = os.open(tmp_path / "backing", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(backing, bytes(range(256)) * 1024, 0)  # 256 KiB of a known pattern
    yield char, backing
    os.close(char)
    os.close(backing)


@pytest.fixture
def harnesses(files):
    """make(**options): a Harness with those options, closed after the test."""
    made: list[Harness] = []

    def make(**options) -> Harness:
        made.append(Harness(files[0], **options))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture
def harness(harnesses):
    return harnesses()
