"""Bad input to the `tokenyard` commands (a fresh-eyes audit, stop 24): every case here
crashed with a traceback, was silently accepted, or failed with an unclear message before.
The rule: exit 2 with one line on stderr saying what, where and what was expected, no
traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_clear_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)


# -- tokenyard up -------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--time-scale", "-1", "expected a finite number >= 0"),
    ("--time-scale", "nan", "expected a finite number >= 0"),
    ("--rank-max-wait-s", "-5", "expected a finite number > 0"),
    ("--ready-timeout-s", "0", "expected a finite number > 0"),
    ("--port", "99999", "expected a TCP port 1-65535"),
])
def test_up_refuses_out_of_range_numbers_before_starting_anything(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, value: str, expected: str) -> None:
    code, _, err = _run(capsys, "up", "--state-dir", str(tmp_path / "st"), "--smoke", flag, value)
    assert code == 2
    _one_clear_line(err, flag, expected)
    assert not (tmp_path / "st").exists()


def test_up_unwritable_state_dir_is_one_line_not_a_traceback(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "up", "--state-dir", str(blocker / "st"), "--smoke", "--port", "0")
    assert code == 2
    _one_clear_line(err, "--state-dir", "expected a writable folder")


def test_up_help_counts_the_gpu_types_it_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.up import DEFAULT_FLEET

    code, out, _ = _run(capsys, "up", "--help")
    assert code == 0
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    assert f"{words[len({s.gpu for s in DEFAULT_FLEET})]} GPU types" in " ".join(out.split())


# -- YAML files, tokenyard config ----------------------------------------------------------

EXAMPLE_ROUTER = Path(__file__).resolve().parents[1] / "router" / "examples" / "production.yaml"


def test_a_binary_yaml_file_is_a_config_error_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe listen: 1\n")
    code, _, err = _run(capsys, "config", "check", str(bad))
    assert code == 2
    _one_clear_line(err, str(bad), "not UTF-8 text", "expected a YAML file")


@pytest.mark.parametrize("where", ["file/x.yaml", "missing/dir/x.yaml", "folder"])
def test_config_migrate_out_that_cannot_be_written_is_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = tmp_path / where
    code, _, err = _run(capsys, "config", "migrate", str(EXAMPLE_ROUTER), "--out", str(out))
    assert code == 2
    _one_clear_line(err, "--out", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert list((tmp_path / "folder").iterdir()) == []
