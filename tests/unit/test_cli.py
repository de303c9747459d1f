"""The command line: the unit's `serve NAME` skips the parser, and nothing else does."""

import pytest

from ublkd import cli


@pytest.mark.parametrize("argv", [["serve", "vol0"], ["serve", "vol-0"]])
def test_the_units_serve_line_goes_without_the_parser(argv):
    assert cli.is_unit_serve(argv)


@pytest.mark.parametrize("argv", [["serve"], ["serve", "-h"], ["serve", "--help"],
                                  ["-v", "serve", "vol0"], ["serve", "vol0", "extra"],
                                  ["status", "vol0"], []])
def test_everything_else_goes_through_the_parser(argv):
    assert not cli.is_unit_serve(argv)


@pytest.mark.parametrize("argv", [["serve", "../vol0"], ["-v", "serve", "../vol0"]])
def test_both_ways_refuse_a_bad_name_alike(argv, capsys):
    assert cli.main(argv) == 2
    assert "../vol0" in capsys.readouterr().err


def test_list_with_no_devices_is_the_header_alone():
    assert cli.list_table([]) == "NAME  ID  DEVICE  STATE  PID  BACKEND  SIZE\n"


def test_list_columns_fit_their_longest_value():
    row = {"name": "vol0", "id": 12, "device": "/dev/ublkb12", "state": "LIVE", "pid": None,
           "backend": "file", "size": "1 GiB"}
    assert cli.list_table([row]).splitlines() == [
        "NAME  ID  DEVICE        STATE  PID  BACKEND  SIZE",
        "vol0  12  /dev/ublkb12  LIVE   -    file     1 GiB"]
