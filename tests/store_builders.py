"""Real attention stores of the tiny conftest models, written without Prefect or Dask (fast): the extraction tasks'
plain functions (`.fn`) and the efficient stage's per-shard function, in this process."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from storage_schemas.attention_store import (
    create_attention_store,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    read_texts,
    store_layout,
    write_example_metadata,
    write_shard,
)
from storage_schemas.efficient_store import mark_efficient_shard_completed
from tasks.efficient import compute_efficient_shard, prepare_variants
from tasks.extraction import ExtractionWork, capture_job_shard, prepare_store, write_job_shard
from tasks.stages import ShardJob
from tests.conftest import REVIEW_ROWS

SETTINGS = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}


def write_corpus(path: Path, copies: int = 1) -> Path:
    """The conftest reviews, `copies` times (each copy's texts marked so that no two rows are equal)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for copy in range(copies):
            writer.writerows((f"{text} (take {copy})" if copies > 1 else text, label) for text, label in REVIEW_ROWS)
    return path


def build_real_store(
    url: str,
    model_folder: Path,
    corpus: Path,
    shard_size: int = 4,
    max_length: int = 24,
    variants: tuple[str, ...] = ("effective", "stochastic", "simplex"),
) -> str:
    """Extract every example of `corpus` with the model at `model_folder` into `url` (shards of `shard_size`), then
    compute `variants` of efficient attention for every shard; all recorded as done, as the stages do."""
    todo, num_labels = prepare_store.fn(
        str(url), str(corpus), str(model_folder), max_length, None, "float32", "cpu", None, None, shard_size, 0
    )
    extract_shards(url, todo, model_folder, num_labels)
    compute_variants(url, variants)
    return url


def grow_real_store(
    url: str,
    model_folder: Path,
    corpus: Path,
    rows: list[tuple[str, str]],
    shard_size: int = 4,
    max_length: int = 24,
    variants: tuple[str, ...] = ("effective", "stochastic", "simplex"),
) -> dict[str, list[int]]:
    """Append `rows` (text, label) to the CSV `corpus` of the growing store at `url` (made by `build_real_store` with
    the same settings), then grow it as a rerun does: prepare (append the new examples), extract the shards left to
    extract and compute `variants` of efficient attention where pending. Returns the shards each step computed:
    {"extract": [...], "efficient": [...]}."""
    with corpus.open("a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    todo, num_labels = prepare_store.fn(
        str(url), str(corpus), str(model_folder), max_length, None, "float32", "cpu", None, None, shard_size, 0
    )
    extract_shards(url, todo, model_folder, num_labels)
    pending = sorted(prepare_variants(url, list(variants), SETTINGS)) if variants else []
    compute_variants(url, variants)
    return {"extract": list(todo), "efficient": pending}


def extract_shards(
    url: str, shards: list[int], model_folder: Path, num_labels: int, task: str = "classification", batch_size: int = 4
) -> None:
    """Capture and write `shards` of the prepared store at `url` with the model at `model_folder` (seed 0), and
    record them done, as the extract stage does (tasks.extraction.EXTRACT_STAGE)."""
    work = ExtractionWork(str(model_folder), num_labels, 0, task)
    group = open_attention_store(url, mode="r+")
    for shard in shards:
        job = ShardJob(str(url), str(url), work, batch_size=batch_size, shard_index=shard)
        mark_shard_completed(group, write_job_shard(job, capture_job_shard(job)))


def compute_variants(url: str, variants: tuple[str, ...]) -> None:
    """Compute `variants` of efficient attention for every pending shard of the store at `url`, as the stage does."""
    if not variants:
        return
    group = open_attention_store(url, mode="r+")
    work = prepare_variants(url, list(variants), SETTINGS)
    for shard, shard_variants in work.items():
        _, written = compute_efficient_shard(url, shard, shard_variants, SETTINGS)
        for variant in written:
            mark_efficient_shard_completed(group, variant, shard)


def build_v1_store(
    url: str,
    model_folder: Path,
    corpus: Path,
    shard_size: int = 4,
    max_length: int = 24,
    variants: tuple[str, ...] = ("effective", "stochastic", "simplex"),
) -> str:
    """`build_real_store`, but in the layout of attention store schema v1 (texts in a `string` array, chunks of one
    example x one layer), as an earlier effattn wrote it: the extraction's data, written through this version's
    writers in v1 mode (create_attention_store(schema_version=1), write_example_metadata, write_shard), with the
    same provenance attributes; then `variants` computed by the efficient stage."""
    source = f"{url}.v2-source"
    build_real_store(source, model_folder, corpus, shard_size, max_length, variants=())
    extracted = open_attention_store(source)
    layout = store_layout(extracted)
    provenance = {
        key: value
        for key, value in extracted.attrs.asdict().items()
        if key not in ("schema", "schema_version", "layout", "completed_shards", "shard_identities", "prepared")
    }
    group = create_attention_store(url, layout, provenance, schema_version=1)
    write_example_metadata(
        group,
        extracted["tokens"][:],
        extracted["length"][:],
        extracted["untruncated_length"][:],
        extracted["source_index"][:],
        extracted["label"][:],
        read_texts(extracted),
    )
    group["w_out"][:] = extracted["w_out"][:]
    group["out_bias"][:] = extracted["out_bias"][:]
    mark_prepared(group)
    for shard in range(layout.n_shards):
        region = layout.shard_slice(shard)
        write_shard(
            group, shard, extracted["attention"][region], extracted["value"][region], extracted["logits"][region]
        )
        mark_shard_completed(group, shard)
    shutil.rmtree(source)
    compute_variants(url, variants)
    return url


def build_text_store(url: str, texts: list[str], labels, shard_size: int = 64, completed=None) -> str:
    """An attention store of `texts` (one layer, one head, 4 positions; no model): the per-example arrays written,
    attention left at zero, shards `completed` (default: all) recorded as extracted. For tests of what reads texts
    and per-example columns (the example table of `effattn view`)."""
    import numpy as np

    from storage_schemas.attention_store import AttentionStoreLayout, completion_update

    n = len(texts)
    layout = AttentionStoreLayout(
        n_examples=n,
        max_length=4,
        n_classes=2,
        layers=1,
        heads=1,
        kv_heads=1,
        head_dim=2,
        hidden=2,
        shard_size=shard_size,
        dtype="float32",
    )
    group = create_attention_store(
        url,
        layout,
        {
            "corpus": {"name": "synthetic", "digest": "none", "class_names": ["bad", "good"]},
            "model": {"name": "none", "weights_digest": "none"},
        },
    )
    length = np.full(n, 4)
    write_example_metadata(
        group, np.ones((n, 4), dtype=np.int32), length, length, np.arange(n), np.asarray(labels), texts
    )
    logits = np.zeros((n, 2), dtype=np.float32)
    logits[np.arange(n), np.arange(n) % 2] = 1.0  # prediction: example index mod 2
    group["logits"][:] = logits
    mark_prepared(group)
    attributes = group.attrs.asdict()
    for shard in range(layout.n_shards) if completed is None else completed:
        attributes.update(completion_update(attributes, shard))
    group.attrs.update({key: attributes[key] for key in ("completed_shards", "shard_identities")})
    return url


def build_causal_results(
    url: str, store_url: str, interventions: list[tuple[str, str, str]], flipped, shards=None, claims=None
) -> str:
    """Causal results of the store at `store_url` written with the results' own writers (no model runs): every
    metric NaN but `flipped` [intervention, example] at the target `all` (and `layer 0`, left NaN); shards `shards`
    (default: all) recorded as complete from the store's current shards. interventions: (name, kind, variant)."""
    import numpy as np

    from storage_schemas.causal_results import (
        causal_input_identities,
        create_causal_results,
        mark_causal_shard_completed,
        shard_region,
        write_causal_shard,
    )

    store = open_attention_store(store_url)
    layout = store_layout(store)
    attributes = store.attrs.asdict()
    metrics = {"flipped": "1 when the prediction changed", "agreement": "share of predictions kept"}
    group = create_causal_results(
        url,
        [
            {"name": name, "kind": kind, "variant": variant, "removed_directions": 0}
            for name, kind, variant in interventions
        ],
        [
            {"name": "all", "scope": "all", "layer": -1, "head": -1},
            {"name": "layer 0", "scope": "layer", "layer": 0, "head": -1},
        ],
        {"source_index": store["source_index"][:], "length": store["length"][:], "label": store["label"][:]},
        layout.shard_size,
        metrics,
        {
            "attention_store": store_url,
            "claims": claims or [],
            "settings": {
                "store_identity": {
                    "weights_digest": attributes["model"]["weights_digest"],
                    "corpus_digest": attributes["corpus"]["digest"],
                    "examples": layout.n_examples,
                }
            },
        },
    )
    variants = sorted({variant for _, _, variant in interventions if variant})
    identities = causal_input_identities(store, variants)
    flipped = np.asarray(flipped, dtype=np.float32)
    for shard in range(layout.n_shards) if shards is None else shards:
        region = shard_region(group, shard)
        size = region.stop - region.start
        values = np.full((len(interventions), 2, size), np.nan, dtype=np.float32)
        values[:, 0] = flipped[:, region]
        write_causal_shard(
            group,
            shard,
            {"flipped": values, "agreement": 1 - values},
            np.zeros((len(interventions), size)),
            np.ones(size),
        )
        mark_causal_shard_completed(group, shard, identities[shard])
    return url


def build_explanation_results(url: str, store_url: str, store_examples: list[int], attributions: dict) -> str:
    """Explanation results of the store at `store_url` written with their own writers (no model runs): explainers
    `attributions` {name: [len(store_examples), max_length] token scores}, every other array at its fill value, one
    shard holding every example, recorded as complete from the store's current shards."""
    import numpy as np

    from storage_schemas.explanation_results import (
        PER_EXAMPLE_ARRAYS,
        create_explanation_results,
        explanation_shard_inputs,
        mark_explanation_shard_completed,
        write_explanation_shard,
    )

    store = open_attention_store(store_url)
    layout = store_layout(store)
    attributes = store.attrs.asdict()
    examples = np.asarray(store_examples)
    group = create_explanation_results(
        url,
        [
            {"name": name, "kind": "matrices", "source": "attention", "aggregation": "last-layer"}
            for name in attributions
        ],
        ["comprehensiveness"],
        [10.0],
        ["leave-one-out"],
        {"store_example": examples, "length": store["length"][:][examples], "label": store["label"][:][examples]},
        layout.layers,
        layout.max_length,
        len(examples),
        {
            "attention_store": store_url,
            "settings": {
                "store_identity": {
                    "weights_digest": attributes["model"]["weights_digest"],
                    "corpus_digest": attributes["corpus"]["digest"],
                    "examples": layout.n_examples,
                }
            },
        },
    )
    arrays = {}
    for name, (_dims, dtype, fill, _) in PER_EXAMPLE_ARRAYS.items():
        arrays[name] = np.full(group[name].shape, fill, dtype=dtype)
    arrays["attribution"] = np.stack([np.asarray(values, dtype=np.float32) for values in attributions.values()])
    write_explanation_shard(group, 0, arrays)
    mark_explanation_shard_completed(group, 0, explanation_shard_inputs(group, store, 0))
    return url


# --- comparing a grown store with one made from scratch ---------------------------------------------------------------


def arrays_by_identity(url: str, index_array: str | None = None, store: str | None = None) -> dict[str, dict]:
    """Every array of the Zarr group at `url` (subgroups included): name -> {identity bytes: the array's slice of
    that example} for arrays with an `example` dimension (moved first), name -> the whole array for the others.
    `url` is an attention store (its own `example_identity`), or results of the store `store` whose array
    `index_array` holds each row's example index in that store."""
    import numpy as np
    import zarr

    group = zarr.open_group(url, mode="r")
    identities = zarr.open_group(store or url, mode="r")["example_identity"][:]
    rows = identities if index_array is None else identities[group[index_array][:]]
    found: dict[str, dict] = {}

    def visit(prefix: str, current) -> None:
        for name, array in current.arrays():
            dims = tuple(array.metadata.dimension_names or ())
            values = array[...]
            if "example" in dims and name not in ("example_identity", "added_by_run", "added_at"):
                values = np.moveaxis(values, dims.index("example"), 0)
                found[prefix + name] = {rows[i].tobytes(): values[i] for i in range(len(rows))}
            elif "example" not in dims:
                found[prefix + name] = {b"": values}
        for name, subgroup in current.groups():
            visit(f"{prefix}{name}/", subgroup)

    visit("", group)
    return found


def assert_same_by_identity(actual: dict[str, dict], expected: dict[str, dict], skip=()) -> None:
    """Every array of `expected` (arrays_by_identity) is in `actual` with the same examples; integers and strings
    equal exactly, floats to 1e-4 relative (the examples of a grown store ran in other batches than from scratch)."""
    import numpy as np

    for name, by_example in expected.items():
        if name in skip:
            continue
        assert name in actual, name
        assert actual[name].keys() == by_example.keys(), f"{name}: other examples"
        for identity, value in by_example.items():
            got = actual[name][identity]
            if np.asarray(value).dtype.kind == "f":
                np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=name)
            else:
                np.testing.assert_array_equal(got, value, err_msg=name)


def assert_run_outputs_equal(grown_store: Path, scratch_store: Path, analysis: str) -> None:
    """The attention store, causal results and explanations of a pipeline run whose store grew equal those of one
    run from scratch, example by example (`analysis`: the outputs' `-<variants>` label, e.g. "effective"); texts are
    stored in another order, and example indices differ."""
    for suffix, index_array, skip in (
        (".zarr", None, ("text_bytes", "text_offsets")),
        (f"-{analysis}.results.zarr", "example", ("example",)),
        (f"-{analysis}.explanations.zarr", "store_example", ("example", "store_example")),
    ):
        name = grown_store.name.removesuffix(".zarr") + suffix
        grown = arrays_by_identity(str(grown_store.parent / name), index_array, str(grown_store))
        expected = arrays_by_identity(str(scratch_store.parent / name), index_array, str(scratch_store))
        assert_same_by_identity(grown, expected, skip=skip)
