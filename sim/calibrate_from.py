"""Calibration from a user's own fleet: `tokenyard calibrate --from FILE ... --gpu --model --tp`.

No table of ours matches every deployment, so this fits one deployment's engine-model factors
from what it already records:

- a Prometheus scrape series of vLLM `/metrics` (a folder or list of text-format scrapes, one
  per file, in scrape order; or the JSON of a Prometheus `query_range` answer): between two
  scrapes, the rise of the TPOT and TTFT histograms' `_sum` / `_count`, the mean of the
  running / waiting gauges, and the prompt / generation token counters give one sample each
  (`PROMETHEUS_NAMES` lists the current and deprecated names of every series read);
- `vllm bench serve --save-result` and guidellm result JSON files: mean TPOT and TTFT with
  the mean running batch from Little's law (request rate x time in decode);
- the router's request records (the CSV / Parquet / JSONL layout `tokenyard sim --records`
  writes: arrival_s, first_token_s, finish_s, input_tokens, output_tokens, instance_id): the
  running batch each request saw during its decode, binned.

Every source becomes `ServingSample`s (TPOT or TTFT at a mean running batch, prompt and output
length); `fit_deployment` fits the factors a deployment can identify (`FROM_FIT_FACTORS`) by
least squares on log(predicted / measured), the rest keep the packaged fit, and
`coverage_problems` names what is missing for each ("no decode samples at batch > 64": the
per-sequence cost cannot be told from the fixed step cost). Model: vLLM V1 (chunked prefill),
`EngineModel.serving_tpot_s`; TTFT = one mixed step with the prompt in it, so samples taken
while requests wait (queueing in TTFT) are left out of the TTFT fit.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scheduler.engine_model import BatchShape, EngineModel, PerfFactors

# Factors one deployment's serving metrics can pin down, with bounds. TTFT (prefill) gives the
# GEMM efficiency, TPOT at small batch and varied context the HBM efficiency and fixed step
# cost, TPOT's slope in batch size the per-sequence cost.
FROM_FIT_FACTORS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.05, 1.0),
    "memory_efficiency": (0.05, 1.0),
    "iteration_overhead_s": (1e-5, 5e-2),
    "per_seq_overhead_s": (1e-8, 5e-3),
}
MIN_TPOT_SAMPLES = 3
SMALL_BATCH = 8  # decode below this is weight-read and fixed-cost bound
LARGE_BATCH = 64  # above it the per-sequence cost shows

# vLLM metric names: current first, then the deprecated / older ones they replaced.
PROMETHEUS_NAMES: dict[str, tuple[str, ...]] = {
    "tpot": ("vllm:request_time_per_output_token_seconds", "vllm:time_per_output_token_seconds",
             "vllm:inter_token_latency_seconds"),
    "ttft": ("vllm:time_to_first_token_seconds",),
    "iteration_tokens": ("vllm:iteration_tokens_total",),
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "prompt_tokens": ("vllm:prompt_tokens_total", "vllm:prompt_tokens"),
    "generation_tokens": ("vllm:generation_tokens_total", "vllm:generation_tokens"),
    "requests": ("vllm:request_success_total", "vllm:request_success"),
}


class CalibrationDataError(ValueError):
    """Input that cannot be calibrated from: the message says which file and what is missing."""


@dataclass(frozen=True, slots=True)
class ServingSample:
    """One measured mean: TPOT or TTFT (seconds) at a mean running batch and mean lengths."""

    source: str  # file it came from
    metric: str  # "tpot" or "ttft"
    value_s: float
    running_seqs: float
    prompt_tokens: float
    output_tokens: float
    weight: float = 1.0  # requests (or intervals) it averages


# ---------------------------------------------------------------------------------- readers


def _parse_prometheus_text(text: str, where: str) -> dict[str, float]:
    """Series key (`name{labels}`, labels sorted) -> value, summed over label sets that differ
    only in model / engine labels; histograms keep `_sum`, `_count` and buckets by `le`."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = defaultdict(float)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                le = sample.labels.get("le")
                key = sample.name + (f"{{le={le}}}" if le is not None else "")
                values[key] += float(sample.value)
    except ValueError as exc:
        raise CalibrationDataError(f"{where}: not Prometheus text exposition format ({exc})") from exc
    return dict(values)


def _first(values: Mapping[str, float], kind: str, suffix: str = "") -> float | None:
    for name in PROMETHEUS_NAMES[kind]:
        for candidate in (name + suffix, name.removesuffix("_total") + suffix):
            if candidate in values:
                return values[candidate]
    return None


def _scrape_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".prom", ".txt", ".metrics"))
        # Natural order: scrape-2 before scrape-10.
        return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    return [path]


def prometheus_samples(path: Path) -> list[ServingSample]:
    """Samples from consecutive scrapes of one engine's `/metrics` (see the module docstring)."""
    files = _scrape_files(path)
    if len(files) < 2:
        raise CalibrationDataError(f"{path}: a Prometheus series needs at least 2 scrapes (files *.prom / *.txt "
                                   f"/ *.metrics in one folder, in scrape order); found {len(files)}")
    scrapes = [_parse_prometheus_text(f.read_text(), str(f)) for f in files]
    if _first(scrapes[0], "tpot", "_count") is None:
        names = ", ".join(PROMETHEUS_NAMES["tpot"])
        raise CalibrationDataError(f"{files[0]}: no TPOT histogram (expected one of {names})")
    return _interval_samples(scrapes, str(path))


def _interval_samples(scrapes: Sequence[Mapping[str, float]], where: str) -> list[ServingSample]:
    samples: list[ServingSample] = []
    for before, after in zip(scrapes, scrapes[1:], strict=False):
        def delta(kind: str, suffix: str, before: Mapping[str, float] = before,
                  after: Mapping[str, float] = after) -> float:
            a, b = _first(after, kind, suffix), _first(before, kind, suffix)
            return (a - b) if a is not None and b is not None else 0.0

        running = [_first(s, "running") for s in (before, after)]
        waiting = [_first(s, "waiting") or 0.0 for s in (before, after)]
        finished = delta("requests", "")
        tpot_n, ttft_n = delta("tpot", "_count"), delta("ttft", "_count")
        if None in running or finished <= 0:
            continue
        batch = (float(running[0]) + float(running[1])) / 2.0  # type: ignore[arg-type]
        prompt = delta("prompt_tokens", "") / max(ttft_n, finished)
        output = delta("generation_tokens", "") / finished
        if tpot_n > 0 and batch >= 1 and output > 1:
            samples.append(ServingSample(where, "tpot", delta("tpot", "_sum") / tpot_n, batch, prompt, output, tpot_n))
        if ttft_n > 0 and max(waiting) == 0 and prompt > 0:
            samples.append(ServingSample(where, "ttft", delta("ttft", "_sum") / ttft_n, batch, prompt, output, ttft_n))
    return samples


def prometheus_range_samples(document: Mapping[str, Any], where: str) -> list[ServingSample]:
    """Samples from a Prometheus `query_range` answer holding the series of PROMETHEUS_NAMES
    (`{"data": {"result": [{"metric": {"__name__": ...}, "values": [[t, "v"], ...]}]}}`)."""
    result = document.get("data", {}).get("result") if isinstance(document.get("data"), Mapping) else None
    if not isinstance(result, list):
        raise CalibrationDataError(f"{where}: expected a Prometheus query_range answer with data.result")
    by_time: dict[float, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for index, series in enumerate(result):
        try:
            labels = series.get("metric", {})
            name = str(labels.get("__name__", ""))
            if "le" in labels:
                name += f"{{le={labels['le']}}}"
            for t, value in series.get("values", []):
                by_time[float(t)][name] += float(value)
        except (AttributeError, TypeError, ValueError) as exc:
            raise CalibrationDataError(f"{where}: data.result[{index}]: expected {{metric: {{__name__, ...}}, "
                                       f"values: [[time, \"value\"], ...]}} ({exc})") from exc
    scrapes = [by_time[t] for t in sorted(by_time)]
    if len(scrapes) < 2:
        raise CalibrationDataError(f"{where}: a Prometheus series needs at least 2 time points; found {len(scrapes)}")
    return _interval_samples(scrapes, where)


def bench_serve_samples(document: Mapping[str, Any], where: str) -> list[ServingSample]:
    """`vllm bench serve --save-result` JSON: mean TPOT / TTFT; running batch by Little's law."""
    try:
        rate = float(document["request_throughput"])
        completed = float(document["completed"])
        tpot_s = float(document["mean_tpot_ms"]) / 1e3
        ttft_s = float(document["mean_ttft_ms"]) / 1e3
        prompt = float(document["total_input_tokens"]) / completed
        output = float(document["total_output_tokens"]) / completed
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CalibrationDataError(f"{where}: not a `vllm bench serve` result (needs request_throughput, completed, "
                                   f"mean_tpot_ms, mean_ttft_ms, total_input_tokens, total_output_tokens): {exc}") from exc
    batch = rate * tpot_s * max(output - 1.0, 0.0)
    out = [ServingSample(where, "tpot", tpot_s, batch, prompt, output, completed)] if batch >= 1 else []
    out.append(ServingSample(where, "ttft", ttft_s, batch, prompt, output, completed))
    return out


def guidellm_samples(document: Mapping[str, Any], where: str) -> list[ServingSample]:
    """guidellm report JSON: one sample per benchmark (rate) of `benchmarks[].metrics`."""
    samples = []
    benchmarks = document.get("benchmarks") or []
    if not isinstance(benchmarks, list):
        raise CalibrationDataError(f"{where}: benchmarks: expected a list of guidellm benchmarks, got "
                                   f"{type(benchmarks).__name__}")
    for index, bench in enumerate(benchmarks):
        metrics = bench.get("metrics", {}) if isinstance(bench, Mapping) else {}

        def mean(name: str, metrics: Mapping[str, Any] = metrics) -> float:
            entry = metrics.get(name, {})
            entry = entry.get("successful", entry) if isinstance(entry, Mapping) else {}
            return float(entry["mean"])

        try:
            tpot_s = mean("time_per_output_token_ms") / 1e3
            ttft_s = mean("time_to_first_token_ms") / 1e3
            prompt, output = mean("prompt_token_count"), mean("output_token_count")
            rate = mean("requests_per_second")
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationDataError(f"{where}: benchmarks[{index}].metrics lacks {exc} (expected guidellm's "
                                       "time_per_output_token_ms, time_to_first_token_ms, prompt_token_count, "
                                       "output_token_count, requests_per_second)") from exc
        batch = rate * tpot_s * max(output - 1.0, 0.0)
        if batch >= 1:
            samples.append(ServingSample(f"{where}#{index}", "tpot", tpot_s, batch, prompt, output))
        samples.append(ServingSample(f"{where}#{index}", "ttft", ttft_s, batch, prompt, output))
    if not samples:
        raise CalibrationDataError(f"{where}: no guidellm benchmarks (expected a 'benchmarks' list)")
    return samples


def _record_rows(path: Path) -> list[Mapping[str, Any]]:
    """The rows of a records file; a CalibrationDataError naming the file (and the line)
    for one that is not UTF-8, a JSON line that does not parse or is not an object, or a
    file pyarrow cannot read."""
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                return list(pq.read_table(path).to_pylist())
            except pa.ArrowException as exc:
                raise CalibrationDataError(f"{path}: not a readable Parquet file ({exc})") from exc
        if path.suffix in (".jsonl", ".ndjson"):
            rows: list[Mapping[str, Any]] = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationDataError(f"{path}:{lineno}: not JSON ({exc.msg}); expected one request "
                                               "record (a JSON object) per line") from exc
                if not isinstance(row, Mapping):
                    raise CalibrationDataError(f"{path}:{lineno}: expected a JSON object (one request record), "
                                               f"got {type(row).__name__}")
                rows.append(row)
            return rows
        import csv

        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path}: not UTF-8 text ({exc.reason}); expected request records "
                                   "(.csv, .jsonl or .parquet)") from exc


def records_samples(path: Path, bins: int = 12) -> list[ServingSample]:
    """Router / simulator request records: per request its TPOT and the mean number of other
    requests decoding on its instance meanwhile; binned by that batch (equal counts)."""
    rows = _record_rows(path)
    needed = ("first_token_s", "finish_s", "input_tokens", "output_tokens", "instance_id", "arrival_s")
    if rows and any(k not in rows[0] for k in needed):
        raise CalibrationDataError(f"{path}: request records need columns {', '.join(needed)}")
    spans: dict[str, list[tuple[float, float, float, float, float]]] = defaultdict(list)
    for index, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise CalibrationDataError(f"{path}: record {index + 1} lacks {', '.join(missing)}; request records "
                                       f"need columns {', '.join(needed)}")
        try:
            first, finish = float(row["first_token_s"]), float(row["finish_s"])
            arrival, prompt, output = float(row["arrival_s"]), float(row["input_tokens"]), float(row["output_tokens"])
        except (TypeError, ValueError):
            continue  # rejected requests have no first token
        if math.isfinite(first) and math.isfinite(finish) and output > 1 and finish > first:
            spans[str(row["instance_id"])].append((first, finish, arrival, prompt, output))
    per_request: list[tuple[float, float, float, float, float]] = []  # batch, tpot, ttft, prompt, output
    for members in spans.values():
        for first, finish, arrival, prompt, output in members:
            overlap = sum(min(finish, f2) - max(first, f1) for f1, f2, *_ in members if f1 < finish and f2 > first)
            per_request.append((overlap / (finish - first), (finish - first) / (output - 1), first - arrival,
                                prompt, output))
    if not per_request:
        no_first = sum(1 for row in rows if row.get("first_token_s") in (None, ""))
        hint = (f" ({no_first} of {len(rows)} records have no first_token_s: a router records it for streamed "
                "answers only, so calibrate from streamed traffic)" if no_first else "")
        raise CalibrationDataError(f"{path}: no finished requests with a first token time and more than one "
                                   f"output token{hint}")
    per_request.sort()
    size = max(1, len(per_request) // bins)
    samples = []
    for start in range(0, len(per_request), size):
        chunk = per_request[start:start + size]
        n = len(chunk)
        batch, tpot, ttft, prompt, output = (sum(c[i] for c in chunk) / n for i in range(5))
        samples.append(ServingSample(str(path), "tpot", tpot, batch, prompt, output, n))
    return samples


def read_samples(path: Path) -> list[ServingSample]:
    """Samples of one `--from` path, its kind told by its content."""
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix in (".prom", ".txt", ".metrics"):
        return prometheus_samples(path)
    if path.suffix in (".csv", ".parquet", ".jsonl", ".ndjson"):
        return records_samples(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationDataError(f"{path}: expected a folder of /metrics scrapes, request records "
                                   f"(.csv/.parquet/.jsonl) or a JSON result file: {exc}") from exc
    if not isinstance(document, Mapping):
        raise CalibrationDataError(f"{path}: expected a JSON object")
    if "benchmarks" in document:
        return guidellm_samples(document, str(path))
    if "mean_tpot_ms" in document:
        return bench_serve_samples(document, str(path))
    if "data" in document:
        return prometheus_range_samples(document, str(path))
    raise CalibrationDataError(f"{path}: JSON of unknown kind (expected `vllm bench serve` (mean_tpot_ms), "
                               "guidellm (benchmarks) or a Prometheus query_range answer (data.result))")


# ---------------------------------------------------------------------------------- fitting


def predict(engine: EngineModel, sample: ServingSample) -> float:
    if sample.metric == "tpot":
        return engine.serving_tpot_s(sample.running_seqs, sample.prompt_tokens, sample.output_tokens,
                                     chunked_prefill=True)
    prompt = int(round(sample.prompt_tokens))
    return engine.iteration_time_s(
        prefill_tokens=prompt, decode_seqs=sample.running_seqs,
        context_tokens=sample.running_seqs * (sample.prompt_tokens + sample.output_tokens / 2.0),
        prefill_attention_pairs=BatchShape.prefill_pairs(prompt, 0), prefill_seqs=1,
    )


def coverage_problems(samples: Sequence[ServingSample]) -> dict[str, str]:
    """Factor -> why the samples cannot identify it (it then keeps its packaged value)."""
    tpot = [s for s in samples if s.metric == "tpot"]
    ttft = [s for s in samples if s.metric == "ttft"]
    problems: dict[str, str] = {}
    if not ttft:
        problems["compute_efficiency"] = "no TTFT samples taken with no request waiting (prefill compute)"
    if not any(s.running_seqs > LARGE_BATCH for s in tpot):
        problems["per_seq_overhead_s"] = (f"no decode samples at batch > {LARGE_BATCH} (the per-sequence cost "
                                          "cannot be told from the fixed step cost)")
    contexts = sorted(s.prompt_tokens + s.output_tokens / 2 for s in tpot)
    if len(tpot) < MIN_TPOT_SAMPLES or contexts[-1] < 1.5 * contexts[0]:
        problems["memory_efficiency"] = ("decode samples do not vary the context length by 1.5x or more "
                                         "(HBM bandwidth cannot be told from the fixed step cost)")
    if not any(s.running_seqs <= SMALL_BATCH for s in tpot) and "memory_efficiency" in problems:
        problems["iteration_overhead_s"] = f"no decode samples at batch <= {SMALL_BATCH}"
    return problems


@dataclass(frozen=True, slots=True)
class DeploymentFit:
    factors: PerfFactors
    fitted: tuple[str, ...]
    problems: dict[str, str]
    errors: dict[str, tuple[int, float, float]]  # metric -> (samples, median APE % before, after)


def _median_ape(engine: EngineModel, samples: Iterable[ServingSample]) -> float:
    values = sorted(abs(predict(engine, s) / s.value_s - 1) * 100 for s in samples)
    return values[len(values) // 2] if values else math.nan


def fit_deployment(engine: EngineModel, samples: Sequence[ServingSample]) -> DeploymentFit:
    """Fit the identifiable FROM_FIT_FACTORS of `engine`'s deployment to `samples`."""
    import numpy as np
    from scipy.optimize import least_squares

    tpot = [s for s in samples if s.metric == "tpot"]
    if len(tpot) < MIN_TPOT_SAMPLES:
        raise CalibrationDataError(f"too little data: {len(tpot)} TPOT sample(s), need at least {MIN_TPOT_SAMPLES} "
                                   "(scrape intervals with finished requests, bench results or record bins)")
    problems = coverage_problems(samples)
    names = [n for n in FROM_FIT_FACTORS if n not in problems]
    base = engine.factors
    bounds = np.log([FROM_FIT_FACTORS[n] for n in names]).T
    x0 = np.clip(np.log([max(getattr(base, n), FROM_FIT_FACTORS[n][0] * 2) for n in names]), bounds[0], bounds[1])
    measured = np.log([s.value_s for s in samples])
    weights = np.sqrt([s.weight for s in samples]) / math.sqrt(sum(s.weight for s in samples))

    def engine_for(vector: Any) -> EngineModel:
        factors = replace(base, **{n: float(math.exp(v)) for n, v in zip(names, vector, strict=True)})
        return EngineModel(engine.gpu, engine.model, engine.tp, factors, engine.gpu_memory_utilization)

    def residuals(vector: Any) -> Any:
        fitted = engine_for(vector)
        return weights * (np.log([max(predict(fitted, s), 1e-12) for s in samples]) - measured)

    solution = least_squares(residuals, x0, bounds=(bounds[0], bounds[1]), x_scale=1.0, xtol=1e-12, ftol=1e-12,
                             gtol=1e-12, max_nfev=2000)
    fitted_engine = engine_for(solution.x)
    errors = {}
    for metric in ("tpot", "ttft"):
        chosen = [s for s in samples if s.metric == metric]
        if chosen:
            errors[metric] = (len(chosen), _median_ape(engine, chosen), _median_ape(fitted_engine, chosen))
    return DeploymentFit(fitted_engine.factors, tuple(names), problems, errors)


def format_fit(fit: DeploymentFit, engine_name: str) -> str:
    lines = [f"calibration of {engine_name} from the deployment's own measurements",
             f"{'metric':<8} {'samples':>7} {'median APE before %':>20} {'after %':>8}"]
    for metric, (count, before, after) in fit.errors.items():
        lines.append(f"{metric:<8} {count:>7} {before:>20.1f} {after:>8.1f}")
    lines.append("fitted: " + (", ".join(f"{n} = {getattr(fit.factors, n):.4g}" for n in fit.fitted) or "nothing"))
    for name, why in fit.problems.items():
        lines.append(f"kept packaged {name}: {why}")
    return "\n".join(lines)


def factors_file_document(fit: DeploymentFit, engine: EngineModel, paths: Sequence[str],
                          default: PerfFactors) -> dict[str, Any]:
    """A factors file (the layout `load_factors_file` reads): the deployment's GPU takes the
    fit, every other GPU type the packaged fallback."""
    return {
        "comment": f"Fitted by `tokenyard calibrate --from` to {engine.name}'s own measurements.",
        "calibrated_from": list(paths),
        "deployment": {"gpu": engine.gpu.name, "model": engine.model.name, "tp": engine.tp},
        "gpus": {engine.gpu.name: fit.factors.as_dict()},
        "default": default.as_dict(),
        "fitted": list(fit.fitted),
        "kept": fit.problems,
        "errors": [{"metric": m, "samples": n, "median_ape_pct_before": round(b, 2), "median_ape_pct_after": round(a, 2)}
                   for m, (n, b, a) in fit.errors.items()],
    }


def synthetic_scrapes(engine: EngineModel, intervals: Sequence[tuple[float, float, float, float]],
                      deprecated_names: bool = False) -> list[str]:
    """Text-format `/metrics` scrapes of an engine timed by `engine` that runs, in turn, each
    (running batch, prompt tokens, output tokens, seconds) interval in steady state: the
    histograms and counters a vLLM server would export (current or deprecated names), scraped
    at the start and at the end of every interval. What the calibration round trip is tested
    with."""
    tpot_name = "vllm:time_per_output_token_seconds" if deprecated_names else "vllm:request_time_per_output_token_seconds"
    totals: dict[str, float] = defaultdict(float)
    scrapes = []
    for batch, prompt, output, seconds in intervals:
        scrapes.append(_scrape_text(tpot_name, totals, batch))
        sample = ServingSample("synthetic", "tpot", 0.0, batch, prompt, output)
        tpot = predict(engine, sample)
        finished = batch * seconds / tpot / output
        totals["tpot_sum"] += finished * tpot
        totals["ttft_sum"] += finished * predict(engine, replace(sample, metric="ttft"))
        totals["finished"] += finished
        totals["prompt"] += finished * prompt
        totals["generation"] += finished * output
        scrapes.append(_scrape_text(tpot_name, totals, batch))
    return scrapes


def _scrape_text(tpot_name: str, totals: Mapping[str, float], running: float) -> str:
    lines = []
    for name, total in ((tpot_name, "tpot_sum"), ("vllm:time_to_first_token_seconds", "ttft_sum")):
        count = totals.get("finished", 0.0)
        lines += [f"# TYPE {name} histogram", f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_count {count}",
                  f"{name}_sum {totals.get(total, 0.0)}"]
    for name, key in (("vllm:prompt_tokens", "prompt"), ("vllm:generation_tokens", "generation"),
                      ("vllm:request_success", "finished")):
        lines += [f"# TYPE {name} counter", f"{name}_total {totals.get(key, 0.0)}"]
    for name, value in (("vllm:num_requests_running", running), ("vllm:num_requests_waiting", 0.0)):
        lines += [f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines) + "\n"
