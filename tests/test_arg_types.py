"""The argparse checks `tokenyard up`, `engine` and the admin commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from cli.main import main
from tokenyard import arg_types


@pytest.mark.parametrize(("check", "good", "bad", "expected"), [
    (arg_types.at_least_one, {"1": 1, "42": 42}, ["0", "-3", "1.5", "x"], "expected an integer >= 1"),
    (arg_types.port, {"0": 0, "65535": 65535}, ["-1", "65536", "80.0"], "expected a TCP port 1-65535 (0: any free port)"),
    (arg_types.non_negative_float, {"0": 0.0, "2.5": 2.5}, ["-0.1", "nan", "inf", "x"], "expected a finite number >= 0"),
    (arg_types.positive_float, {"0.01": 0.01}, ["0", "-1", "nan", "inf"], "expected a finite number > 0"),
    (arg_types.seconds, {"10": 10.0}, ["0", "nan", "inf", "-2"], "expected a number of seconds > 0"),
])
def test_checks_accept_and_refuse(check: Callable[[str], float], good: dict[str, float], bad: list[str],
                                  expected: str) -> None:
    for text, value in good.items():
        assert check(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check(text)


@pytest.mark.parametrize(("argv", "needle"), [
    (["engine", "--port", "70000"], "argument --port: expected a TCP port 1-65535 (0: any free port), got '70000'"),
    (["engine", "--tp", "0"], "argument --tp: expected an integer >= 1, got '0'"),
    (["engine", "--block-size", "-16"], "argument --block-size: expected an integer >= 1, got '-16'"),
])
def test_engine_flags_out_of_range_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                    needle: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
