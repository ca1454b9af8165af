"""Start-up failures of `tokenyard router`: one line saying what and where, exit 1, no
traceback, nothing left listening. Also: the YAML shown in the docs is valid YAML."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port


def run_router(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "router.yaml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "cli.main", "router", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tokenyard router:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["redis-down", "port-in-use", "port-too-large", "redis-db-index", "tokens-missing"])
def test_start_up_failures_are_one_clear_line(tmp_path: Path, case: str) -> None:
    port = free_port()
    holder = None
    if case == "redis-down":
        config, args, expected = f"store: redis://127.0.0.1:{free_port()}/0\n", ["--port", str(port)], \
            "cannot reach Redis at redis://127.0.0.1:"
    elif case == "port-in-use":
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        config, args, expected = ("listen: {host: 127.0.0.1}\n", ["--port", str(port)],
                                  f"cannot listen on 127.0.0.1:{port}: address in use")
    elif case == "port-too-large":
        config, args, expected = "listen: {host: 127.0.0.1}\n", ["--port", "70000"], "port must be 0-65535"
    elif case == "redis-db-index":
        config, args, expected = "store: redis://127.0.0.1:6379/99\n", ["--port", str(port)], "database index"
    else:
        config, args, expected = (f"control: {{port: {free_port()}, tokens_file: {tmp_path}/missing.yaml}}\n",
                                  ["--port", str(port)], "cannot read the control tokens file")
    try:
        line = one_line(run_router(tmp_path, config, *args))
    finally:
        if holder is not None:
            holder.close()
    assert expected in line, line
    if case != "port-in-use":  # nothing was left listening on the router's port
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_yaml_shown_in_the_docs_is_valid() -> None:
    for doc in sorted((REPO_ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)):
            try:
                yaml.safe_load(block)
            except yaml.YAMLError as exc:
                raise AssertionError(f"{doc.name}: yaml block {i + 1} is invalid: {exc}") from None


def test_tokenyard_up_on_a_taken_port_is_one_line_and_stops_its_engines(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, "-m", "cli.main", "up", "--port", str(port), "--state-dir",
                                 str(tmp_path / "state"), "--time-scale", "0", "--smoke"],
                                capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    finally:
        holder.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tokenyard up:")]
    assert lines == [f"tokenyard up: router: cannot listen on 127.0.0.1:{port}: address in use"], result.stderr
    engines = yaml.safe_load((tmp_path / "state" / "router.yaml").read_text())["discovery"]["static"]
    for engine in engines:  # the engines it started are gone again
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(engine["url"].rsplit(":", 1)[1]))) != 0
