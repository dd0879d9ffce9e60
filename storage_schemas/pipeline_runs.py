"""The outputs of one pipeline run on disk: where they go, and when a stage's output is complete.

A run of `flows.pipeline.run_pipeline` keeps its outputs in a run folder (default `runs/`):

    <name>.zarr           the attention store, with efficient attention in its `efficient` / `diagnostics` groups
    <name>[-<variants>].results.zarr   the causal results (`-<variants>`, e.g. `-effective+simplex`, when not
                                       every variant is analysed)
    <name>[-<variants>]-report/        the report

where `<name>` is `<corpus>-<model>-<limit>` (`all` without a limit; a file or folder contributes its name without
the extension), followed by `-<8 hex digits>` of the other extraction settings when any of them differs from its
default, so that a run with other settings never lands in another run's store. A corpus file or folder grows: its
name stays the same whatever its content, and a later run appends to the store what the corpus added (the store
keeps its model); `effattn run --retrain` trains a new head on the corpus as it is and starts the next generation,
`<name>-g2`, `<name>-g3`, ..., and later runs follow the newest generation (`latest_generation`).

A stage is skipped when its output is complete for the same inputs:

- extraction: the store is prepared, every shard is in its `completed_shards`, and its root attribute
  `pipeline_extraction_inputs` equals this run's extraction inputs. The pipeline writes that attribute only after
  the extraction has finished, so a store written by `effattn extract` alone (no such attribute) is handed to the
  extraction stage again, which resumes it (nothing left to do) or refuses it when it is another run's.
  Inputs that are local files or folders (a user corpus, a model folder) are identified by a fingerprint of their
  files' names, sizes and modification times, so editing them is noticed; bundled corpora and models are
  identified by name (their packages are pinned).
- efficient: for every requested variant, `efficient/<variant>` exists with the same settings and every shard is
  in its `completed_shards` and current (computed from the extraction shard as it is now).
- causal: the results were made with the same settings, every shard is done and current (measured on the store's
  shards as they are now), and the claims table is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage_schemas.attention_store import (
    AttentionStoreError,
    attention_store_state,
    completed_shards,
    open_attention_store,
    store_layout,
)
from storage_schemas.efficient_store import (
    DIAGNOSTIC_ARRAYS,
    diagnostic_array_path,
    efficient_array_path,
    efficient_completed_shards,
)
from storage_schemas.stage_checks import StageCheck

EXTRACTION_INPUTS_ATTRIBUTE = "pipeline_extraction_inputs"


def name_part(name_or_path: str) -> str:
    """A file-name-safe part for a corpus or model: a bundled name as is, a path by its last component without
    extension (`data/reviews.csv` -> `reviews`); characters other than letters, digits, `.`, `_`, `-` become `-`."""
    path = Path(name_or_path)
    text = path.stem if path.is_file() else path.name or str(name_or_path)
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned or "input"


def settings_digest(settings: dict[str, Any]) -> str:
    """8 hex digits of a canonical JSON of `settings` (order of keys does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]


def run_name(corpus: str, model: str, limit: int | None, non_default_settings: dict[str, Any] | None = None) -> str:
    """`<corpus>-<model>-<limit>` (limit `all` when None), plus `-<settings digest>` when `non_default_settings`
    (the extraction settings that differ from their defaults) is not empty."""
    name = f"{name_part(corpus)}-{name_part(model)}-{limit if limit is not None else 'all'}"
    if non_default_settings:
        name += f"-{settings_digest(non_default_settings)}"
    return name


def generation_name(name: str, generation: int) -> str:
    """The outputs' name of generation `generation` of a growing corpus's run `name`: `name` for the first,
    `name-g<k>` for the k-th (`effattn run --retrain` starts the next one)."""
    return name if generation == 1 else f"{name}-g{generation}"


def latest_generation(run_dir: str, name: str) -> int:
    """The newest generation whose attention store exists under `run_dir` (1 when none does)."""
    base = Path(run_dir)
    found = [1] + [
        int(match.group(1))
        for path in base.glob(f"{glob_escape(name)}-g*.zarr")
        if (match := re.fullmatch(re.escape(name) + r"-g(\d+)\.zarr", path.name)) and int(match.group(1)) >= 2
    ]
    return max(found)


def glob_escape(text: str) -> str:
    """`text` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


@dataclass(frozen=True)
class RunPaths:
    """Where one run's outputs go."""

    store: str  # the attention store (Zarr v3 group)
    results: str  # the causal results (Zarr)
    report: str  # the report folder


def run_paths(run_dir: str, name: str, analysis_label: str | None = None) -> RunPaths:
    """The outputs of run `name` under `run_dir`. `analysis_label` (e.g. the variants analysed, when not all of
    them) is appended to the results' and the report's names: one attention store can hold several analyses."""
    base = str(run_dir).rstrip("/")
    analysis = f"{name}-{analysis_label}" if analysis_label else name
    return RunPaths(
        store=f"{base}/{name}.zarr", results=f"{base}/{analysis}.results.zarr", report=f"{base}/{analysis}-report"
    )


def local_input_fingerprint(name_or_path: str) -> str | None:
    """For an existing local file or folder: `sha256:<hex>` over the relative name, size and modification time
    (ns) of every file in it (so an edited corpus file or a retrained model folder gets a new fingerprint).
    None for anything else (a bundled corpus or model name)."""
    path = Path(name_or_path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(item for item in path.rglob("*") if item.is_file())
    digest = hashlib.sha256()
    for item in files:
        stat = item.stat()
        relative = item.name if item == path else item.relative_to(path).as_posix()
        digest.update(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return "sha256:" + digest.hexdigest()


def _canonical(value: Any) -> Any:
    """What `value` reads back as from a JSON attribute (tuples become lists)."""
    return json.loads(json.dumps(value))


def extraction_status(url: str, inputs: dict[str, Any], defaults: dict[str, Any] | None = None) -> StageCheck:
    """Whether the attention store at `url` is completely extracted for exactly these extraction `inputs`.
    `defaults`: the default of inputs that later versions added (e.g. layers, heads): a store recorded before one
    existed lacks it, and was extracted with its default."""
    state = attention_store_state(url)
    if state == "absent":
        return StageCheck(False, f"no attention store at {url} yet")
    if state == "unprepared":
        return StageCheck(False, f"the creation of {url} never finished")
    if state != "prepared":
        return StageCheck(False, f"{url} holds something that is not an attention store")
    try:
        group = open_attention_store(url, mode="r")
    except AttentionStoreError as error:
        return StageCheck(False, str(error))
    n_shards = store_layout(group).n_shards
    pending = n_shards - len(set(completed_shards(group)))
    if pending:
        return StageCheck(False, f"{pending} of {n_shards} shards still to extract")
    recorded = group.attrs.get(EXTRACTION_INPUTS_ATTRIBUTE)
    if recorded is None:
        return StageCheck(False, "the store has no record of the pipeline inputs that wrote it")
    recorded = {**_canonical({name: value for name, value in (defaults or {}).items() if name in inputs}), **recorded}
    expected = _canonical(inputs)
    if recorded != expected:
        keys = sorted(key for key in set(recorded) | set(expected) if recorded.get(key) != expected.get(key))
        return StageCheck(False, f"it was extracted with other inputs ({', '.join(keys)})")
    return StageCheck(True, f"all {n_shards} shards extracted for the same inputs")


def extraction_complete(url: str, inputs: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    return extraction_status(url, inputs, defaults).complete


def record_extraction_inputs(url: str, inputs: dict[str, Any]) -> None:
    """Record that the store at `url` was completely extracted for `inputs` (call only after the extraction)."""
    group = open_attention_store(url, mode="r+")
    n_shards = store_layout(group).n_shards
    pending = sorted(set(range(n_shards)) - set(completed_shards(group)))
    if pending:
        raise AttentionStoreError(
            f"{url}: shards {pending} are not extracted yet, so the store cannot be recorded as complete: "
            "finish the extraction first"
        )
    group.attrs[EXTRACTION_INPUTS_ATTRIBUTE] = _canonical(inputs)


def efficient_status(url: str, variants: list[str], settings: dict[str, Any]) -> StageCheck:
    """Whether every shard of every variant in `variants` is computed in the store at `url` with `settings`."""
    try:
        group = open_attention_store(url, mode="r")
    except AttentionStoreError as error:
        return StageCheck(False, str(error))
    n_shards = store_layout(group).n_shards
    expected = _canonical(settings)
    missing = []
    for variant in variants:
        path = efficient_array_path(variant)
        if path not in group:
            missing.append(f"{variant} not computed")
            continue
        if group[path].attrs.get("settings") != expected:
            missing.append(f"{variant} computed with other settings")
            continue
        pending = n_shards - len(set(efficient_completed_shards(group, variant)))
        if pending:
            missing.append(f"{variant}: {pending} of {n_shards} shards to compute")
    if missing:
        return StageCheck(False, "; ".join(missing))
    return StageCheck(True, f"{', '.join(variants)}: all {n_shards} shards computed with the same settings")


def efficient_complete(url: str, variants: list[str], settings: dict[str, Any]) -> bool:
    return efficient_status(url, variants, settings).complete


def read_diagnostics(url: str, variant: str) -> dict[str, np.ndarray]:
    """The diagnostics of `variant` in the store at `url`: name -> [example, layer, head] array."""
    group = open_attention_store(url, mode="r")
    if efficient_array_path(variant) not in group:
        raise AttentionStoreError(
            f"{url} has no efficient attention of variant {variant!r}: run `effattn efficient --store {url} "
            f"--variants {variant}` first"
        )
    return {name: group[diagnostic_array_path(variant, name)][:] for name in DIAGNOSTIC_ARRAYS}


def causal_status(url: str, settings: dict[str, Any], store: str) -> StageCheck:
    """Complete when the causal results at `url` were made with `settings`, every shard is done and still current
    for the attention store at `store` (measured on its shards as they are now), and the claims table is written
    (storage_schemas.causal_results)."""
    from storage_schemas.causal_results import CAUSAL_RESULTS

    return CAUSAL_RESULTS.status(url, settings, store)


REPORT_SOURCE_FILE = "report-source.json"


def _report_source(results: str) -> dict[str, Any]:
    from storage_schemas.causal_results import open_causal_results

    attributes = open_causal_results(results, mode="r").attrs.asdict()
    grown = attributes.get("store_examples")  # results of a store that grows: a grown store needs a new report
    return {
        "results": results,
        "created": attributes.get("created"),
        "claims_digest": settings_digest({"claims": attributes.get("claims")}),
        **({} if grown is None else {"store_examples": grown}),
    }


def report_status(report_dir: str, results: str) -> StageCheck:
    """Complete when `report_dir/index.html` exists and was drawn from these results as they are now."""
    folder = Path(report_dir)
    if not (folder / "index.html").is_file():
        return StageCheck(False, f"{folder / 'index.html'} does not exist")
    source = folder / REPORT_SOURCE_FILE
    if not source.is_file() or json.loads(source.read_text()) != _report_source(results):
        return StageCheck(False, f"{folder} was drawn from other results")
    return StageCheck(True, f"{folder / 'index.html'} is up to date")


def record_report_source(report_dir: str, results: str) -> None:
    """Write which results the report in `report_dir` was drawn from (after it is complete)."""
    (Path(report_dir) / REPORT_SOURCE_FILE).write_text(json.dumps(_report_source(results), indent=1))
