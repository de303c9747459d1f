"""The exit code table: the CLI and the man page rely on it, so the code must match the docs."""

import re

import pytest

from ublkd import errors

EXPECTED = {
    "ConfigError": 2, "StateError": 2, "DriverNotLoadedError": 3, "NotRootError": 3,
    "KernelError": 4, "DeviceBusyError": 5, "BackendError": 6, "DeviceNotFoundError": 7,
    "MissingDependencyError": 8, "HandOverRefusedError": 9,
}


def test_every_user_error_has_its_code():
    found = {cls.__name__: cls.exit_code for cls in errors.UblkdError.__subclasses__()}
    assert found == EXPECTED
    assert (errors.EXIT_OK, errors.EXIT_INTERNAL) == (0, 1)


@pytest.mark.parametrize("name, code", EXPECTED.items())
def test_module_docstring_table_matches(name, code):
    assert re.search(rf"^\s+{code}\s+{name}\s", errors.__doc__, re.MULTILINE)


def test_message_is_the_str_and_only_argument():
    error = errors.KernelError("ADD_DEV of vol0 failed: EEXIST")
    assert str(error) == "ADD_DEV of vol0 failed: EEXIST"
    with pytest.raises(TypeError):
        errors.ConfigError("two", "arguments")
