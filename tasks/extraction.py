"""The extraction stage: its Prefect tasks (thin wrappers over analysis.extraction and storage_schemas) and its
declaration, `EXTRACT_STAGE`, run by tasks.stages.run_stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from prefect import task
from prefect.cache_policies import NO_CACHE

from analysis.corpora import example_identities, load_corpus
from analysis.example_identities import IDENTITY_BYTES
from analysis.extraction import (
    CapturedShard,
    capture_examples,
    plan_extraction,
    rows_to_append,
    store_attributes,
    usable_max_length,
)
from analysis.models import has_trained_head, output_projection_slices
from analysis.splits import select_split
from analysis.training import TrainingSettings, head_to_train, trained_head_provenance
from storage_schemas.attention_store import (
    APPEND_ATTRIBUTE,
    KEYED_SELECTION,
    PERMUTATION_SELECTION,
    AttentionStoreError,
    AttentionStoreLayout,
    abandon_append,
    attention_store_state,
    begin_append,
    check_same_run,
    commit_append,
    completed_shards,
    create_attention_store,
    default_shard_size,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    open_store_to_append,
    recreate_unprepared_store,
    store_grows,
    store_layout,
    store_runs,
    stored_identities,
    write_example_metadata,
    write_shard,
)
from storage_schemas.selection import SELECTION_ATTRIBUTE, StoreSelection, selection_of_group
from tasks.models import cached_model
from tasks.stages import ShardJob, Stage, StageRun, run_logger
from tasks.training import train_head

if TYPE_CHECKING:  # flows/ imports tasks/, never the other way at run time
    from flows.settings import ExtractSettings


def resume_keys(attributes: dict) -> dict:
    """The attributes that must match for a rerun to resume into an existing store."""
    return {
        "model.weights_digest": attributes["model"]["weights_digest"],
        # the same weights with another tokenizer would pair stored tokens with a different vocabulary
        "tokenizer.class": attributes["tokenizer"]["class"],
        "tokenizer.vocab_size": attributes["tokenizer"]["vocab_size"],
        "tokenizer.pad_token_id": attributes["tokenizer"]["pad_token_id"],
        "corpus.digest": attributes["corpus"]["digest"],
        "corpus.selection": attributes["corpus"]["selection"],
        "extraction.requested_max_length": attributes["extraction"]["requested_max_length"],
        "dtype": attributes["dtype"],
        "extraction.task": attributes["extraction"]["task"],
        "extraction.top_k": attributes["extraction"]["top_k"],
    }


def growth_keys(attributes: dict) -> dict:
    """The attributes that must match for a rerun to append to a store that grows: the resume keys, less the
    corpus content (which grows). The class names may differ (a class whose rows were all deleted); a new class
    among the appended examples is refused by `append_examples`."""
    keys = {key: value for key, value in resume_keys(attributes).items() if key != "corpus.digest"}
    keys["corpus.columns"] = attributes["corpus"]["columns"]  # other columns: every identity would change
    keys["corpus.file_name"] = attributes["corpus"]["file_name"]  # another file or folder is another corpus
    return keys


def this_run() -> dict:
    """The run that adds examples: its id (the Prefect flow run's, else a fresh one) and start time (UTC)."""
    import uuid
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    run_id = flow_run.id
    started = datetime.now(UTC)
    return {
        "run_id": str(run_id) if run_id else uuid.uuid4().hex,
        "flow_run_name": flow_run.name if run_id else None,
        "started": started.isoformat(timespec="seconds"),
        "started_seconds": int(started.timestamp()),
    }


def selected_rows(loaded_corpus, split: str, seed: int, held_out_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(the rows of `split`, in corpus order; the identities of every row): a growable corpus's split is the keyed
    one (growth never moves an earlier example), a bundled corpus's the permutation (analysis.splits)."""
    identities = example_identities(loaded_corpus)
    rows = select_split(
        len(loaded_corpus),
        loaded_corpus.labels,
        split,
        seed,
        held_out_fraction,
        groups=loaded_corpus.groups,
        identities=identities if loaded_corpus.growable else None,
    )
    return np.asarray(rows, dtype=np.int64), identities


@task(name="prepare-attention-store", cache_policy=NO_CACHE)
def prepare_store(
    store: str,
    corpus: str,
    model: str,
    max_length: int,
    limit: int | None,
    dtype: str,
    device: str,
    text_column: str | None,
    label_column: str | None,
    shard_size: int | None,
    seed: int,
    task: str = "classification",
    top_k: int = 10,
    split: str = "all",
    held_out_fraction: float = 0.2,
    layers: str | None = None,
    heads: str | None = None,
) -> tuple[list[int], int]:
    """Create the store (tokens, texts, labels, model constants) or check that an existing one is this run's; a
    store of a corpus that grows (a user file or folder) gets the examples it lacks appended (`append_examples`).

    `split` ("all", "train", "held_out") chooses the corpus rows (see analysis.splits; `seed` and
    `held_out_fraction` fix the split as in training). `layers` / `heads`: the --layers / --heads text (None: all);
    the store holds only those (storage_schemas.selection) and records them as its `selection` attribute.
    Returns (shards still to extract, classes of the head).
    """
    loaded_corpus = load_corpus(corpus, text_column=text_column, label_column=label_column)
    # a store that grows keeps its head's classes (a new class among its new examples is refused when appending)
    grows = loaded_corpus.growable and attention_store_state(store) == "prepared"
    classes = zarr.open_group(store, mode="r").attrs["corpus"]["class_names"] if grows else loaded_corpus.class_names
    num_labels = max(len(classes), 2)
    loaded = cached_model(model, num_labels, device, seed, task)
    shape = loaded.shape
    selection = StoreSelection.parse(layers, heads, shape.layers, shape.heads, shape.kv_heads)
    selection.check_storable()
    rows, identities = selected_rows(loaded_corpus, split, seed, held_out_fraction)
    usable = usable_max_length(loaded.model, max_length)
    if loaded_corpus.growable:
        plan = plan_extraction(
            loaded_corpus.texts,
            loaded.tokenizer,
            usable,
            candidate_rows=rows_to_append(rows, identities, np.zeros((0, IDENTITY_BYTES), np.uint8), limit),
            pad_to=usable,
        )
    else:
        plan = plan_extraction(
            loaded_corpus.texts, loaded.tokenizer, usable, limit=limit, seed=seed, candidate_rows=rows
        )
    top_k = top_k if task == "next-token" else 0
    head = trained_head_provenance(model) if task == "classification" else {"trained": False}
    attributes = store_attributes(
        loaded,
        loaded_corpus,
        plan,
        requested_max_length=max_length,
        limit=limit,
        dtype=dtype,
        seed=seed,
        top_k=top_k,
        split=split,
        head=head,
    )
    attributes["corpus"]["selection"]["method"] = KEYED_SELECTION if loaded_corpus.growable else PERMUTATION_SELECTION
    attributes[SELECTION_ATTRIBUTE] = selection.to_attribute()
    state = attention_store_state(store)
    if state == "prepared":
        group = (open_store_to_append if loaded_corpus.growable else open_attention_store)(store)
        growing = store_grows(group.attrs.asdict())
        expected = growth_keys(attributes) if growing else resume_keys(attributes)
        if SELECTION_ATTRIBUTE in group.attrs or not selection.is_everything:  # a store without one holds all
            # the model indices stored (another model's counts are named by its weights digest already)
            expected[f"{SELECTION_ATTRIBUTE}.layers"] = list(selection.layers)
            expected[f"{SELECTION_ATTRIBUTE}.heads"] = list(selection.heads)
        if "method" not in group.attrs["corpus"]["selection"]:  # written before the method was recorded
            expected["corpus.selection"] = {
                key: value for key, value in expected["corpus.selection"].items() if key != "method"
            }
        if loaded_corpus.growable and not growing:
            refuse_growth_of_permutation_store(group, store, attributes)
        check_same_run(group, store, expected)
        if growing:
            append_examples(group, store, loaded_corpus, loaded.tokenizer, rows, identities, limit)
    elif state in ("absent", "unprepared"):
        layout = AttentionStoreLayout(
            n_examples=len(plan.length),
            max_length=plan.max_length,
            n_classes=num_labels if task == "classification" else int(loaded.model.config.vocab_size),
            layers=len(selection.layers),  # the stored counts; `selection` maps them to the model's
            heads=len(selection.heads),
            kv_heads=len(selection.kv_heads),
            head_dim=shape.head_dim,
            hidden=shape.hidden,
            shard_size=shard_size
            or default_shard_size(plan.max_length, len(selection.layers), len(selection.heads), dtype),
            dtype=dtype,
            task=task,
            top_k=top_k,
        )
        run = this_run()
        attributes["runs"] = [
            {**run, "first_example": 0, "examples_added": len(plan.length), "corpus_digest": loaded_corpus.digest}
        ]
        create = create_attention_store if state == "absent" else recreate_unprepared_store
        group = create(store, layout, attributes)
        write_planned_examples(group, plan, loaded_corpus, loaded_corpus.labels[plan.source_index], 0, 0, run)
        w_out, out_bias = output_projection_slices(loaded.model, loaded.adapter)
        group["w_out"][:] = w_out[np.ix_(selection.layers, selection.heads)]
        group["out_bias"][:] = out_bias[list(selection.layers)]
        mark_prepared(group)
    else:
        raise AttentionStoreError(
            f"{store} exists and is not an effattn attention store: choose another --store (nothing was changed)"
        )
    done = set(completed_shards(group))
    return [index for index in range(store_layout(group).n_shards) if index not in done], num_labels


def write_planned_examples(group, plan, loaded_corpus, labels, start: int, run_index: int, run: dict) -> None:
    """Write the per-example arrays of `plan`'s examples from example `start` on: their tokens, lengths, corpus rows,
    `labels` (the store's class ids), texts and identities, added by run `run_index` of the store (`run`: this_run)."""
    write_example_metadata(
        group,
        tokens=plan.tokens,
        length=plan.length,
        untruncated_length=plan.untruncated_length,
        source_index=plan.source_index,
        label=labels,
        text=[loaded_corpus.texts[row] for row in plan.source_index],
        start=start,
        run=run_index,
        added_at=run["started_seconds"],
    )


def refuse_growth_of_permutation_store(group, store: str, attributes: dict) -> None:
    """A store that chose its rows by today's permutation split cannot grow (one new row reshuffles the split): say
    so, and how to start a store that grows, unless the corpus has not changed (then the store is just resumed)."""
    if group.attrs["corpus"].get("digest") == attributes["corpus"]["digest"]:
        return
    raise AttentionStoreError(
        f"{store} was made before stores could grow: it chose its rows by a seeded permutation of the whole corpus, "
        "which a new row reshuffles, and the corpus has changed since. It stays readable as it is. To follow a "
        "growing corpus, start a store that grows: run the same command with another --store (or without --store: "
        "`effattn run` names it after the corpus and settings), and later runs append to it"
    )


def append_examples(group, store: str, loaded_corpus, tokenizer, rows, identities, limit: int | None) -> None:
    """Append to a store that grows the selected corpus rows whose identities it lacks (at most `limit` examples in
    all), sorted by length among themselves, with the store's positions and class names; the new shards (and the
    old last shard, when it was partial) are left for extraction. An append interrupted before it was recorded is
    redone from the store's recorded examples. Logs how many stored examples the corpus no longer holds."""
    layout = store_layout(group)
    stored = stored_identities(group)
    pending = group.attrs.get(APPEND_ATTRIBUTE)
    corpus_keys = {bytes(row) for row in identities}
    gone = sum(bytes(row) not in corpus_keys for row in stored)
    if gone:
        run_logger("effattn.extraction").warning(
            "%s: %d of its %d examples are no longer in the corpus %s (deleted or edited rows); they stay in the store",
            store,
            gone,
            layout.n_examples,
            loaded_corpus.name,
        )
    new_rows = rows_to_append(rows, identities, stored, limit)
    if not len(new_rows):
        if pending is not None:
            abandon_append(group)
        return
    class_names = list(group.attrs["corpus"]["class_names"])
    new_names = sorted(
        {loaded_corpus.class_names[label] for label in loaded_corpus.labels[new_rows] if label >= 0} - set(class_names)
    )
    if new_names:
        raise AttentionStoreError(
            f"{store}: the corpus now has the classes {new_names}, which the store's head does not know (it has "
            f"{class_names}): a store keeps one model for its life. Train a head on the grown corpus and start a new "
            "store with `effattn run --retrain ...`"
        )
    plan = plan_extraction(
        loaded_corpus.texts, tokenizer, layout.max_length, candidate_rows=new_rows, pad_to=layout.max_length
    )
    labels = np.array(
        [
            class_names.index(loaded_corpus.class_names[label]) if label >= 0 else -1
            for label in loaded_corpus.labels[plan.source_index]
        ],
        dtype=np.int64,
    )
    run = this_run()
    n_examples = layout.n_examples + len(plan.length)
    begin_append(group, n_examples)
    write_planned_examples(group, plan, loaded_corpus, labels, layout.n_examples, len(store_runs(group)), run)
    shards = commit_append(
        group,
        n_examples,
        {
            **run,
            "first_example": layout.n_examples,
            "examples_added": len(plan.length),
            "corpus_digest": loaded_corpus.digest,
            "no_longer_in_corpus": int(gone),
        },
        {
            "digest": loaded_corpus.digest,
            "corpus_size": len(loaded_corpus),
            "dropped_empty": int(loaded_corpus.dropped_empty),
            "example_count": n_examples,
        },
    )
    run_logger("effattn.extraction").info(
        "%s: %d new examples appended (examples %d to %d); shards %s to extract",
        store,
        len(plan.length),
        layout.n_examples,
        n_examples - 1,
        shards,
    )


def _capture_stored_selection(loaded, group, region: slice, batch_size: int) -> CapturedShard:
    """capture_examples over the examples `region` of the store, keeping the layers and heads the store holds."""
    layout = store_layout(group)
    selection = selection_of_group(group)
    return capture_examples(
        loaded,
        group["tokens"][region],
        group["length"][region],
        batch_size=batch_size,
        dtype=layout.dtype,
        top_k=max(layout.top_k, 1),
        layers=selection.layers,
        heads=selection.heads,
        kv_heads=selection.kv_heads,
    )


@dataclass(frozen=True)
class ExtractionWork:
    """What every extraction shard's job carries (`ShardJob.plan`), found by `prepare_extraction`: the model to
    run (the trained head's folder when the run trained one) and its class count, the seed and the task."""

    model: str
    num_labels: int
    seed: int
    task: str


def growing_store_model(store: str) -> tuple[str, str] | None:
    """(model, split) of the store at `store` when it is one that grows (None otherwise): a rerun extracts the
    examples a grown corpus adds with the store's own model, trained or not (a store keeps one model for its life),
    and the store's split. Refuses a store whose trained head is no longer where it was."""
    if attention_store_state(store) != "prepared":
        return None
    group = zarr.open_group(store, mode="r")
    if not store_grows(group.attrs.asdict()):
        return None
    model = group.attrs["model"]
    head = model.get("head", {})
    if head.get("trained") and not Path(model["name"]).is_dir():
        raise AttentionStoreError(
            f"{store} grows with the head it was made with, {model['name']}, which is gone (its cache was cleared?): "
            "put it back, or train a head on the corpus as it is now and start a new store with `effattn run "
            "--retrain ...`"
        )
    return model["name"], group.attrs["corpus"]["selection"]["split"]


def stored_base_model(store: str) -> str | None:
    """The base model of a store's trained head (None: its model is not a trained head)."""
    head = zarr.open_group(store, mode="r").attrs["model"].get("head", {})
    return head.get("base_model") if head.get("trained") else None


def prepare_extraction(run: StageRun) -> ExtractionWork:
    """Under the store's lock: train the head first when the run needs one (`run.plan`: the run's
    flows.settings.ExtractSettings), then create the store or check that it is this run's (`prepare_store`).
    Returns what the shards' jobs carry."""
    settings: ExtractSettings = run.plan
    model, split, seed = settings.model, settings.split, settings.seed
    loaded_corpus = load_corpus(settings.corpus, text_column=settings.text_column, label_column=settings.label_column)
    grows_with = growing_store_model(run.store) if loaded_corpus.growable else None
    if grows_with is not None and settings.model in (grows_with[0], stored_base_model(run.store)):
        # the store's model, not a head trained on the grown corpus; its split unless --split says another (refused)
        model, split = grows_with[0], split or grows_with[1]
    elif head_to_train(loaded_corpus, settings.task, settings.train, has_trained_head(model)):
        training = TrainingSettings(epochs=settings.epochs, max_length=settings.max_length, seed=seed)
        model = train_head(
            model, settings.corpus, settings.text_column, settings.label_column, training.as_dict(), settings.cache_root
        )
        split = split or "held_out"
    split = split or "all"
    _, num_labels = prepare_store(
        run.store,
        settings.corpus,
        model,
        settings.max_length,
        settings.limit,
        settings.dtype,
        run.device,
        settings.text_column,
        settings.label_column,
        settings.shard_size,
        seed,
        settings.task,
        settings.top_k,
        split,
        layers=settings.layers,
        heads=settings.heads,
    )
    return ExtractionWork(model, num_labels, seed, settings.task)


def capture_job_shard(job: ShardJob) -> CapturedShard:
    """Run the model over one shard's examples (`job.plan`: an ExtractionWork); returns the shard's tensors. The
    loaded model's weights digest must be the store's: no shard is written from other weights (a model folder
    changed meanwhile, or differing between Dask workers). The model stays loaded for the next shard
    (tasks.models.cached_model: one model per process)."""
    work: ExtractionWork = job.plan
    loaded = cached_model(work.model, work.num_labels, job.device, work.seed, work.task)
    group = open_attention_store(job.store, mode="r")
    expected = group.attrs["model"]["weights_digest"]
    if loaded.weights_digest != expected:
        raise AttentionStoreError(
            f"{job.store}, shard {job.shard_index}: the model {work.model} loaded here has weights digest "
            f"{loaded.weights_digest[:16]}…, the store was prepared with {expected[:16]}…: give every worker the "
            "same model files (a path they share, or the same copy on each machine)"
        )
    return _capture_stored_selection(loaded, group, store_layout(group).shard_slice(job.shard_index), job.batch_size)


def write_job_shard(job: ShardJob, captured: CapturedShard) -> int:
    """Write one whole shard of captured tensors to the store (the stage's retry policy retries a transient I/O
    error: it rewrites the same whole shard); returns the shard index."""
    group = open_attention_store(job.store, mode="r+")
    write_shard(
        group,
        job.shard_index,
        captured.attention,
        captured.value,
        captured.logits,
        captured.logit_ids,
        captured.logsumexp,
    )
    return job.shard_index


def store_shard_count(group, store_group) -> int:
    return store_layout(group).n_shards


def extracted_shards(group, store_group) -> list[int]:
    return completed_shards(group)


def no_stale_shards(group, store_group) -> list[int]:
    """Extraction reads the corpus, not store shards: none of its shards goes stale (a changed corpus or model is
    refused by `prepare_store`)."""
    return []


def record_extracted_shard(group, shard_index: int, written: int) -> None:
    mark_shard_completed(group, shard_index)


def extracted_store(store: str, results: str) -> str:
    return store


EXTRACT_STAGE = Stage(
    name="extract",
    shards="extract shards",
    prepare=prepare_extraction,
    open_output=open_attention_store,
    shard_count=store_shard_count,
    completed_shards=extracted_shards,
    forget_stale_shards=no_stale_shards,
    compute_shard=capture_job_shard,
    write_shard=write_job_shard,
    mark_completed=record_extracted_shard,
    summarise=extracted_store,
)
