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


# -- tokenyard calibrate, tokenyard model predict -------------------------------------------


def test_calibrate_from_a_folder_without_scrapes_says_how_many_it_found(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("no scrapes here")
    code, _, err = _run(capsys, "calibrate", "--from", str(tmp_path), "--gpu", "H100-80GB", "--model", "llama-3.1-8b")
    assert code == 2
    _one_clear_line(err, str(tmp_path), "at least 2 scrapes", "found 0")
    assert "{" not in err  # the count was an uninterpolated "{len(files)}"


@pytest.mark.parametrize(("argv", "needle"), [
    (["--gpu", "H100-80GB"], "--gpu: only with --from PATH"),
    (["--tp", "2"], "--tp: only with --from PATH"),
    (["--from", "x.jsonl", "--gpu", "H100-80GB", "--model", "llama-3.1-8b", "--plot", "p.png"],
     "--plot: not with --from"),
])
def test_calibrate_flags_that_would_be_ignored_are_errors(
        capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, _, err = _run(capsys, "calibrate", *argv)
    assert code == 2
    _one_clear_line(err, needle)


def test_calibrate_write_that_cannot_be_written_is_refused_before_the_fit(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, out, err = _run(capsys, "calibrate", "--data", str(tmp_path), "--write", str(tmp_path / "file" / "f.json"))
    assert code == 2 and out == ""
    _one_clear_line(err, "--write", "is a file")


def test_model_predict_refuses_a_context_past_the_models_and_says_whether_the_batch_fits(
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code, _, err = _run(capsys, "model", "predict", "--gpu", "H100-80GB", "--model", "llama-3-70b", "--tp", "4",
                        "--context", "99999")
    assert code == 2
    _one_clear_line(err, "--context", "at most 8192 tokens", "99999")
    code, out, _ = _run(capsys, "model", "predict", "--gpu", "H100-80GB", "--model", "llama-3-70b", "--tp", "4",
                        "--batch", "320", "--context", "8192", "--json")
    report = json.loads(out)
    assert code == 0 and report["fits"] is True
    assert report["batch_kv_tokens"] == 320 * 8192 > report["kv_capacity_tokens"]
    assert report["batch_fits_kv"] is False
    code, out, _ = _run(capsys, "model", "predict", "--gpu", "H100-80GB", "--model", "llama-3-70b", "--tp", "4",
                        "--batch", "320", "--context", "8192")
    assert "batch's KV (320 x 8192)" in out and "does not fit" in out


# -- the admin CLI (no control plane needed: each is refused before the first call) -------


@pytest.fixture
def _admin_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    token = tmp_path / "token"
    token.write_text("t0123456789abcdef0123\n")
    monkeypatch.setenv("TOKENYARD_CONTEXTS", str(tmp_path / "contexts.yaml"))
    policy = tmp_path / "acme.yaml"
    policy.write_text("name: acme\nspec: {slo_class: interactive}\n")
    # port 1: nothing listens, so a command that reached the network would exit 7 instead
    return ["--address", "127.0.0.1:1", "--token-file", str(token), "--timeout-s", "2"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["policy", "get", "acme", "--version", "-1"], "--version: expected an integer >= 1"),
    (["policy", "history", "acme", "--limit", "-5"], "--limit: expected an integer >= 1"),
    (["policy", "rollback", "acme", "--to", "0", "--reason", "r"], "--to: expected an integer >= 1"),
    (["policy", "list", "--timeout-s", "0"], "--timeout-s: expected a number of seconds > 0"),
    (["policy", "list", "--timeout-s", "nan"], "--timeout-s: expected a number of seconds > 0"),
])
def test_admin_out_of_range_numbers_are_usage_errors(capsys: pytest.CaptureFixture[str], _admin_target: list[str],
                                                     argv: list[str], needle: str) -> None:
    """--version -1 / --limit -5 were a protobuf 'Value out of range' traceback; --timeout-s 0
    was 'Deadline Exceeded' (exit 7) as if the control plane were down."""
    code, _, err = _run(capsys, *argv, *_admin_target)
    assert code == 2
    _one_clear_line(err, needle)


@pytest.mark.parametrize("extra", [["--dry-run", "--trace", "t.csv"], ["--window", "30m", "--reason", "r", "--yes"],
                                   ["--cluster", "c.yaml", "--reason", "r", "--yes"],
                                   ["--dry-run=client", "--sim-requests", "10"]])
def test_policy_apply_replay_flags_without_dry_run_server_are_refused(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, _admin_target: list[str], extra: list[str]) -> None:
    """They were silently ignored: `--dry-run --trace FILE` replayed nothing, and `--window 30m`
    beside a real apply stored the policy as if no flag had been given."""
    code, _, err = _run(capsys, "policy", "apply", "-f", str(tmp_path / "acme.yaml"), *extra, *_admin_target)
    assert code == 2
    _one_clear_line(err, "only with --dry-run=server")


def test_policy_apply_bad_window_is_refused_before_any_call(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, _admin_target: list[str]) -> None:
    code, out, err = _run(capsys, "policy", "apply", "-f", str(tmp_path / "acme.yaml"), "--dry-run=server",
                          "--window", "abc", *_admin_target)
    assert code == 2 and out == ""  # no diff printed first: the window was checked after it
    _one_clear_line(err, "--window", "expected a duration like 1h")


# -- tokenyard tier score -----------------------------------------------------------------


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"prompt": 5}\n', "in.jsonl:1: prompt: expected a string or a list of strings, got int"),
    (b'{"prompt": "ok"}\n{"messages": "hi"}\n', "in.jsonl:2: messages: expected a list of {role, content}"),
    (b'\xff\xfe{"prompt": "x"}\n', "in.jsonl: not UTF-8 text (invalid start byte); expected JSON lines"),
])
def test_tier_score_bad_records_name_the_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              content: bytes, needle: str) -> None:
    """A number as the prompt was scored as an empty prompt; a binary file was a bare
    "'utf-8' codec can't decode" without the file."""
    (tmp_path / "in.jsonl").write_bytes(content)
    code, out, err = _run(capsys, "tier", "score", "--input", str(tmp_path / "in.jsonl"))
    assert code == 2 and out == ""
    _one_clear_line(err, needle)


@pytest.mark.parametrize(("where", "why"), [("file/x.jsonl", "file is a file"), ("folder", "it is a folder")])
def test_tier_score_output_that_cannot_be_written_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              where: str, why: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "in.jsonl").write_text('{"prompt": "What is 2+2?"}\n')
    code, _, err = _run(capsys, "tier", "score", "--input", str(tmp_path / "in.jsonl"), "--output",
                        str(tmp_path / where))
    assert code == 2
    _one_clear_line(err, f"--output {tmp_path / where}: cannot write", why)
    assert list((tmp_path / "folder").iterdir()) == []


# -- --help -------------------------------------------------------------------------------


def _all_parsers() -> list[tuple[str, object]]:
    import argparse

    from cli.main import build_parser

    found: list[tuple[str, object]] = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)

    walk("tokenyard", build_parser())
    return found


def test_no_help_text_shows_a_meaningless_or_second_default() -> None:
    """ArgumentDefaultsHelpFormatter appended "(default: None)" to 30-odd options, also after
    a help text that had said its default ("(default: --model) (default: None)")."""
    import re

    for name, parser in _all_parsers():
        text = " ".join(parser.format_help().split())  # type: ignore[attr-defined]
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:  # type: ignore[attr-defined]
            rendered = parser._get_formatter()._expand_help(action) if action.help else ""  # type: ignore[attr-defined]
            assert len(re.findall(r"\(default", rendered)) <= 1, (name, rendered)


def test_router_help_quotes_the_native_figure_the_readme_quotes() -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    figure = re.search(r"~\d+(?:-\d+)?% fewer instructions per (?:non-streaming )?request", readme)
    assert figure is not None
    helps = dict(_all_parsers())
    text = " ".join(helps["tokenyard router"].format_help().split())  # type: ignore[attr-defined]
    assert figure.group(0) in text
    assert "no token check" not in text  # the picker port has had a token check since the tokens file


# -- tokenyard router ---------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "needle"), [
    (["--extproc-shed-outstanding", "3"], "--extproc-shed-outstanding: only with --extproc-port PORT"),
    (["--extproc-host", "0.0.0.0", "--extproc-allow-unauthenticated"],
     "--extproc-host, --extproc-allow-unauthenticated: only with --extproc-port PORT"),
    (["--extproc-port", "70000"], "--extproc-port: expected a port 0-65535 (0: any free port), got 70000"),
    (["--extproc-port", "0", "--extproc-shed-outstanding", "-1"],
     "--extproc-shed-outstanding: expected a count >= 0 (0: never shed), got -1"),
])
def test_router_picker_flags_are_checked_and_not_ignored(tmp_path: Path, extra: list[str], needle: str) -> None:
    """The picker's flags without --extproc-port were ignored (a router "shedding at 3"
    shed nothing); a bad port and a bad count shared one message naming both."""
    import os
    import subprocess
    import sys

    config = tmp_path / "r.yaml"
    config.write_text("listen: {host: 127.0.0.1, port: 0}\n"
                      "discovery: {static: [{id: e0, url: 'http://127.0.0.1:9', model: llama-3-8b}]}\n")
    env = {**os.environ, "TOKENYARD_ROUTER_NATIVE": "off",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "cli.main", "router", "--config", str(config),
                             "--store", f"file://{tmp_path / 'state.db'}", *extra],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    _one_clear_line(result.stderr, needle)


# -- tokenyard train tier -----------------------------------------------------------------


@pytest.mark.parametrize(("extra", "needle"), [
    (["--out", "{tmp}/file/x.json"], "--out {tmp}/file/x.json: cannot write ({tmp}/file is a file)"),
    (["--out", "{tmp}/m.json", "--report", "{tmp}/file/r.json"], "--report {tmp}/file/r.json: cannot write"),
    (["--out", "{tmp}/m.json", "--plots", "{tmp}/file"], "--plots {tmp}/file: cannot write (it is a file)"),
    (["--out", "{tmp}/m.json", "--length-prior-weight", "2"], "--length-prior-weight: expected a number in [0, 1]"),
])
def test_train_tier_refuses_unwritable_outputs_and_bad_weights_before_training(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], needle: str) -> None:
    """Were a FileExistsError traceback after the training (with --report, after --out had
    been written); the weight's error came after loading the data and named no flag."""
    (tmp_path / "file").write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "question {i}", "small_ok": {str(i % 2 == 0).lower()}}}\n'
                            for i in range(40)))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, err = _run(capsys, "train", "tier", "--data", str(data), *argv)
    assert code == 2
    _one_clear_line(err, needle.replace("{tmp}", str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "file"]
    assert "fit/s" not in err  # no training started (its progress bar)


# -- tensor-parallel degrees vLLM refuses -------------------------------------------------


def test_tensor_parallel_problem_follows_vllms_head_rule() -> None:
    from scheduler.catalog import default_catalog, tensor_parallel_problem

    llama = default_catalog().model("llama-3-8b")  # 32 attention heads
    assert [tp for tp in range(1, 17) if tensor_parallel_problem(llama, tp) is None] == [1, 2, 4, 8, 16]
    problem = tensor_parallel_problem(llama, 3)
    assert problem is not None and "32 attention heads" in problem and "tp 3" in problem


@pytest.mark.parametrize("argv", [
    ["model", "predict", "--gpu", "H100-80GB", "--model", "llama-3-70b", "--tp", "3"],
    ["engine", "--tp", "3", "--port", "0"],
    ["plan", "--trace", "unused.csv", "--rate", "2", "--tp", "1,3", "--no-progress"],
])
def test_a_tp_that_does_not_divide_the_heads_is_refused(capsys: pytest.CaptureFixture[str],
                                                        argv: list[str]) -> None:
    """Was accepted: model predict priced 3 GPUs, and an engine served at tp 3, both for a
    configuration vLLM will not start."""
    code, _, err = _run(capsys, *argv)
    assert code == 2
    _one_clear_line(err, "attention heads, which tp 3 does not divide")


def test_a_cluster_pool_with_such_a_tp_is_a_config_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cluster = tmp_path / "c.yaml"
    cluster.write_text("pools:\n  - {name: a, gpu: A100-80GB, model: llama-3-8b, tp: 3, count: 1}\n")
    code, _, err = _run(capsys, "config", "check", str(cluster))
    assert code == 2
    _one_clear_line(err, "c.yaml: pools[0].tp: llama-3-8b has 32 attention heads")


# -- docs ---------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_ranking_docs_cluster_snippet_is_a_current_cluster_file(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """docs/ranking.md showed the older dialect (`queue: {policy: ...}`), which a cluster file
    with a `policy:` document refuses ("the policy document replaces this key")."""
    text = (DOCS / "ranking.md").read_text()
    start = text.index("In a simulator cluster file")
    block = text[start:].split("\n\n")[1]
    snippet = "\n".join(line[4:] for line in block.splitlines())
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("pools:\n  - {name: a, gpu: A100-80GB, model: llama-3-8b, count: 1}\n" + snippet + "\n")
    code, out, err = _run(capsys, "config", "check", str(cluster))
    assert code == 0, err
    assert "(policy document)" in out
    assert "with `queue: {policy: {learned_rank: {max_wait_s: 60}}}` in `cluster.yaml`" not in " ".join(text.split())


# -- python -m router.k8s_loopback ----------------------------------------------------------


@pytest.mark.parametrize(("argv", "content", "needle"), [
    (["--port", "70000"], None, "--port: expected a TCP port 0-65535"),
    (["--objects", "{file}"], b"- resource: pods\n  object: {a: 1\n  x: [\n", "objects.yaml:"),
    (["--objects", "{file}"], b"\xff\xfe- resource: pods\n", "not UTF-8 text"),
])
def test_k8s_loopback_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            argv: list[str], content: bytes | None, needle: str) -> None:
    """--port 70000 was an OverflowError traceback; a YAML error printed four lines."""
    from router.k8s_loopback import main as loopback_main

    objects = tmp_path / "objects.yaml"
    if content is not None:
        objects.write_bytes(content)
    assert loopback_main([a.replace("{file}", str(objects)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("r.jsonl", b'{"a": 1}\n{not json\n', "r.jsonl:2: not JSON"),
    ("r.jsonl", b'[1, 2]\n', "r.jsonl:1: expected a JSON object"),
    ("r.csv", b"arrival_s,x\n\xff\xfe,1\n", "r.csv: not UTF-8 text"),
    ("r.parquet", b"x", "r.parquet: not a readable Parquet file"),
    ("r.jsonl", b'{"first_token_s": 1, "finish_s": 2, "input_tokens": 3, "output_tokens": 4, "instance_id": "a", '
                b'"arrival_s": 0}\n{"finish_s": 2}\n', "r.jsonl: record 2 lacks first_token_s"),
    ("r.jsonl", b'{"first_token_s": null, "finish_s": 2, "input_tokens": 3, "output_tokens": 4, "instance_id": "a", '
                b'"arrival_s": 0}\n', "streamed answers only"),
])
def test_calibrate_from_bad_records_name_the_file_and_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           name: str, content: bytes, needle: str) -> None:
    """A malformed JSON line, a binary file, a bad Parquet file and a record lacking a column
    were tracebacks (JSONDecodeError, UnicodeDecodeError, ArrowInvalid, KeyError)."""
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = _run(capsys, "calibrate", "--from", str(path), "--gpu", "A100-80GB", "--model", "llama-3-8b")
    assert code == 2
    _one_clear_line(err, needle)


@pytest.mark.parametrize(("content", "needle"), [
    ('{"benchmarks": 5}', "j.json: benchmarks: expected a list of guidellm benchmarks, got int"),
    ('{"data": {"result": [5]}}', "j.json: data.result[0]: expected {metric"),
    ('{"data": {"result": [{"metric": {}, "values": [["a", "b"]]}]}}', "j.json: data.result[0]: expected {metric"),
])
def test_calibrate_from_malformed_result_json_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          content: str, needle: str) -> None:
    """Were TypeError / AttributeError / ValueError tracebacks."""
    path = tmp_path / "j.json"
    path.write_text(content)
    code, _, err = _run(capsys, "calibrate", "--from", str(path), "--gpu", "A100-80GB", "--model", "llama-3-8b")
    assert code == 2
    _one_clear_line(err, needle)


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:99999", "127.0.0.1:", ":50051", "127.0.0.1:0"])
def test_context_and_address_need_host_and_port(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                _admin_target: list[str], address: str) -> None:
    """`context set --address 127.0.0.1:99999` was saved, and gRPC then dialled port 34463
    (99999 mod 65536); a missing port dialled 443."""
    token = tmp_path / "token"
    code, _, err = _run(capsys, "context", "set", "x", "--address", address, "--token-file", str(token))
    assert code == 2
    _one_clear_line(err, "--address: expected HOST:PORT with a port 1-65535", repr(address))
    assert not (tmp_path / "contexts.yaml").exists()
    code, _, err = _run(capsys, "policy", "list", "--address", address, "--token-file", str(token))
    assert code == 2
    _one_clear_line(err, "--address: expected HOST:PORT")


def test_a_max_model_len_past_the_models_context_is_refused(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    """Was accepted (vLLM refuses it): the engine then admitted prompts the model cannot take."""
    code, _, err = _run(capsys, "engine", "--port", "0", "--max-model-len", "999999")
    assert code == 2
    _one_clear_line(err, "max_model_len 999999 is longer than llama-3-8b's context length (8192 tokens)")
    cluster = tmp_path / "c.yaml"
    cluster.write_text("pools:\n  - {name: a, gpu: A100-80GB, model: llama-3-8b, count: 1, "
                       "engine: {max_model_len: 99999}}\n")
    code, _, err = _run(capsys, "config", "check", str(cluster))
    assert code == 2
    _one_clear_line(err, "c.yaml: pools[0].engine.max_model_len: expected at most llama-3-8b's context length")
