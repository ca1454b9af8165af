"""ML.ENERGY leaderboard measurements as calibration observations (real vLLM serving runs).

Reads every `perf/mlenergy_<task>/derived_llm_perf_by_gpu_batch_<task>.csv` under the data
folder (the flattened form of ml-energy/leaderboard-v2's per-run JSON files; see
shared/data/MANIFEST.md): one row per (model, GPU, max batch size, TP) with the average time
per output token at the average running batch, and the average output length. Such a TPOT
is the engine's steady state: each step decodes the running batch and admits
batch / output_tokens new requests whose prefills share the steps
(`EngineModel.serving_tpot_s`), so it measures per-step cost under real serving, CPU
overheads included.

The files do not record prompt lengths. `TASK_PROMPT_TOKENS` holds the *effective* prefill
tokens per request, chosen by cross-validation: over 1, 20, 50, 100, 400 and 1,000 tokens the
held-out median error of the four folds was 7.9, 8.4, 10.0, 12.9, 23.2 and 56.2% (code task),
so the measured TPOT carries far less prefill work than HumanEval-sized prompts (~150 tokens)
in separate steps would add; what remains is the per-sequence CPU cost, linear in the batch. Model ids resolve through the catalog (`Catalog.find_model`: HF ids, instruct
variants); rows of models or GPUs the catalog does not know are skipped and counted in the
log, never guessed.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from scheduler.catalog import Catalog
from sim.calibrate_data import read_csv

log = logging.getLogger(__name__)

# Effective prefill tokens per request in the TPOT of a task (see the module docstring);
# tasks without an entry take the code task's.
TASK_PROMPT_TOKENS: dict[str, float] = {"code": 20.0}
DEFAULT_PROMPT_TOKENS = 20.0

REQUIRED_COLUMNS = ("model", "gpu", "TP", "PP", "avg_tpot_s", "avg_output_tokens", "avg_bs_reqs", "max_bs_reqs")


def gpu_from_device_name(device: str) -> str | None:
    """Catalog GPU name of an `nvidia-smi` device name (`NVIDIA A100-SXM4-40GB`), or None."""
    text = device.upper().replace(" ", "")
    if "A100" in text:
        return "A100-40GB" if "40GB" in text else "A100-80GB"
    if "H100" in text:
        return "H100-80GB"
    for name in ("H200", "L40S", "A10G"):
        if name in text:
            return name
    if text.endswith("L4") or "NVIDIAL4" in text:
        return "L4"
    return None


def task_files(data_dir: Path) -> list[tuple[str, Path]]:
    """(task, CSV path) of every ML.ENERGY derived table under `data_dir/perf`."""
    found = []
    for path in sorted((data_dir / "perf").glob("mlenergy_*/derived_llm_perf_by_gpu_batch_*.csv")):
        found.append((path.stem.rsplit("_", 1)[-1], path))
    return found


def mlenergy_rows(
    data_dir: Path, catalog: Catalog, prompt_tokens: float | None = None
) -> list[dict[str, float | str | int]]:
    """One dict per usable row: gpu, model (catalog names), tp, task, running_seqs,
    output_tokens, prompt_tokens, tpot_s, max_batch. Rows with PP > 1, unknown names or
    non-positive figures are skipped (and counted in the log)."""
    rows: list[dict[str, float | str | int]] = []
    skipped: Counter[str] = Counter()
    for task, path in task_files(data_dir):
        prompt = prompt_tokens if prompt_tokens is not None else TASK_PROMPT_TOKENS.get(task, DEFAULT_PROMPT_TOKENS)
        for row in read_csv(path, REQUIRED_COLUMNS):
            gpu = gpu_from_device_name(row["gpu"])
            model = catalog.find_model(row["model"])
            if gpu is None or model is None:
                skipped[f"{row['model']} on {row['gpu']}"] += 1
                continue
            try:
                tp, pp = int(row["TP"]), int(row["PP"])
                tpot, output = float(row["avg_tpot_s"]), float(row["avg_output_tokens"])
                running, max_batch = float(row["avg_bs_reqs"]), int(float(row["max_bs_reqs"]))
            except ValueError as exc:
                raise ValueError(f"{path}: row for {row['model']}: {exc}") from exc
            if pp != 1 or tpot <= 0 or output <= 0 or running <= 0:
                skipped["pipeline-parallel or empty"] += 1
                continue
            rows.append({
                "gpu": gpu, "model": model.name, "tp": tp, "task": task, "running_seqs": running,
                "output_tokens": output, "prompt_tokens": prompt, "tpot_s": tpot, "max_batch": max_batch,
            })
    if skipped:
        log.warning("mlenergy rows skipped (not in the catalog, or unusable)", extra={"skipped": dict(skipped)})
    return rows
