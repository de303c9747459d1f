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
