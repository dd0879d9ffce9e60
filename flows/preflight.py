"""Checks of a command's inputs that the CLI runs before any Prefect flow is imported or started.

A bad input is refused here in one line within seconds, and nothing is written: the Prefect server (5-45 s to
start) never starts for it. Each check raises ValueError (or AttentionStoreError, a ValueError) whose message says
what is wrong and what to do, and names the command-line flag. The flows check the same things again as they run
(a flow called from Python gets the same refusals); this module only moves the refusal before Prefect.

Plain functions: no Prefect import here. The cheap checks come first (paths, the corpus), the ones that import
torch or reach a cluster last.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from analysis.variants import require_known_variants
from storage_schemas.remote import check_store_reachable, is_remote
from tasks.dask_cluster import connect_dask_scheduler


def check_writable_location(url: str, flag: str) -> None:
    """Refuse a local path where nothing can be created: the path itself or a parent folder is a regular file, or
    the nearest existing folder does not accept new files (tried by creating and removing an empty folder there:
    `/proc`, a read-only disk, missing permissions). Remote URLs (s3://...) are not checked here."""
    if is_remote(url):
        return
    path = Path(fsspec.core.url_to_fs(url)[1])
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{flag} {url} is a file, not a folder: {flag} names a folder (created if needed); choose another path "
            "or move that file away. Nothing was written"
        )
    folder = path.parent  # the store's lock file is written beside it, so its parent folder must be writable
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(
            f"cannot create {flag} {url}: {folder} is a file, not a folder: choose a {flag} whose parent folders "
            "are folders. Nothing was written"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".effattn-write-check-", dir=folder))
    except OSError as error:
        raise ValueError(
            f"cannot create {flag} {url}: the folder {folder} does not accept new files ({error.strerror or error}): "
            f"choose a {flag} in a folder this user may write to, or fix that folder's permissions. Nothing was "
            "written"
        ) from None


def check_device(device: str) -> None:
    """Refuse `--device cuda` where torch cannot use a CUDA device (before a model loads or anything is written)."""
    if device != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    why = (
        f"this torch ({torch.__version__}) was built without CUDA"
        if torch.version.cuda is None
        else "no CUDA device is visible to torch"
    )
    raise ValueError(
        f"--device cuda: {why}: run with --device cpu, or on a machine with a GPU and a CUDA build of "
        "torch. Nothing was written"
    )


def check_dask_scheduler(address: str | None) -> None:
    """Refuse a `--dask-address` where no scheduler answers (connects, then disconnects)."""
    if address:
        connect_dask_scheduler(address).close()


def check_writable_store(url: str, flag: str) -> None:
    """Refuse an existing local store whose folder accepts no new files (a read-only disk or mount, missing
    permissions): a stage that writes into it would fail after starting. Tried by creating and removing an empty
    folder inside it. Remote URLs and stores not there yet pass (check_writable_location checks a new one)."""
    if is_remote(url):
        return
    path = Path(fsspec.core.url_to_fs(url)[1])
    if not path.is_dir():
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".effattn-write-check-", dir=path))
    except OSError as error:
        raise ValueError(
            f"cannot write into {flag} {url}: the store's folder does not accept new files "
            f"({error.strerror or error}; a read-only disk or mount, or missing permissions): copy the store to a "
            f"place this user may write to and pass that as {flag}, or fix the permissions. Nothing was written"
        ) from None


def check_unlocked(url: str) -> None:
    """Refuse a store whose writer lock a live run holds (storage_schemas.store_lock), without taking the lock."""
    from storage_schemas.store_lock import check_store_unlocked

    check_store_unlocked(url)


def check_attention_store(url: str):
    """Refuse a store that is unreachable, absent or not a valid attention store (the message says how to make
    one). Returns the opened zarr group."""
    from storage_schemas.attention_store import open_attention_store

    check_store_reachable(url)
    return open_attention_store(url, mode="r")


def check_max_length(max_length: int) -> None:
    """Refuse a `--max-length` below 2 (a special token and one real token; analysis.extraction.plan_extraction
    refuses it too, but only once the model has loaded)."""
    if max_length < 2:
        raise ValueError(
            f"--max-length must be at least 2 tokens, got {max_length}: give a larger --max-length "
            "(default 128). Nothing was written"
        )


def check_existing_store_matches(settings: Any) -> None:
    """`effattn extract` into an existing store: refuse one written from another corpus (content digest; for a store
    that grows, another file or folder), with
    another --max-length, --dtype or --task (the store's attributes against the settings and the corpus file; the
    model's weights are compared when the stage loads it). Nothing to do for a new store."""
    from analysis.corpora import corpus_file_name, load_corpus
    from storage_schemas.attention_store import (
        attention_store_state,
        check_same_run,
        open_attention_store,
        store_grows,
    )

    if attention_store_state(settings.store) != "prepared":
        return
    group = open_attention_store(settings.store, mode="r")
    corpus = load_corpus(settings.corpus, text_column=settings.text_column, label_column=settings.label_column)
    # a store that grows takes what its corpus adds: the same file or folder, not the same content
    same_corpus = (
        {"corpus.file_name": corpus_file_name(corpus)}
        if store_grows(group.attrs.asdict())
        else {"corpus.digest": corpus.digest}
    )
    check_same_run(
        group,
        settings.store,
        {
            **same_corpus,
            "extraction.requested_max_length": int(settings.max_length),
            "dtype": settings.dtype,
            "extraction.task": settings.task,
        },
    )


def check_model_name(model: str) -> None:
    """Refuse a model that names neither a bundled model nor a local model folder, before torch is imported."""
    from analysis.model_sources import resolve_model_source

    resolve_model_source(model)


def _flagged(flag: str, check, *arguments):
    """`check(*arguments)`, its ValueError prefixed with the flag whose value it refuses."""
    try:
        return check(*arguments)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def check_interventions(settings: Any) -> list[str] | None:
    """Parse the causal command's intervention names (--interventions, --layer-interventions,
    --head-interventions; imports torch, so only when some are given): an unknown one is refused naming its flag.
    Returns the variants the --interventions read from the store (None when they are not given)."""
    given = {
        flag: names
        for flag, names in (
            ("--interventions", settings.interventions),
            ("--layer-interventions", settings.layer_interventions),
            ("--head-interventions", settings.head_interventions),
        )
        if names
    }
    if not given:
        return None
    from analysis.interventions import parse_interventions

    parsed = {flag: _flagged(flag, parse_interventions, list(names)) for flag, names in given.items()}
    if "--interventions" not in parsed:
        return None
    return sorted({item.variant_name for item in parsed["--interventions"] if item.needs_efficient})


def check_causal_inputs(settings: Any) -> None:
    """`effattn causal`: the names of the variants and interventions, and a store whose extraction and needed
    efficient attention are finished (what flows.causal refuses once it runs), from the store's attributes."""
    from storage_schemas.attention_store import require_extracted
    from storage_schemas.causal_results import causal_variants, require_causal_inputs

    group = check_attention_store(settings.store)
    require_extracted(group, settings.store, "causal")
    if settings.variants:
        require_known_variants(settings.variants)
    needed = check_interventions(settings)
    if needed is None:
        needed = causal_variants(group, settings.store, settings.variants, settings.interventions)
    require_causal_inputs(group, settings.store, needed)


def check_explain_inputs(settings: Any) -> None:
    """`effattn explain`: a store whose extraction is finished in every shard (its examples are drawn from all of
    them, tasks.explain.choose_examples) and, without --methods, that holds finished efficient attention."""
    from storage_schemas.attention_store import store_layout
    from storage_schemas.explanation_results import require_explanation_inputs, require_stored_variants

    group = check_attention_store(settings.store)
    examples = range(store_layout(group).n_examples)
    require_explanation_inputs(group, settings.store, examples, [])
    if settings.methods is None:
        require_explanation_inputs(group, settings.store, examples, require_stored_variants(group, settings.store))


def check_causal_results(url: str) -> None:
    """Refuse causal results that are absent or invalid."""
    from storage_schemas.causal_results import open_causal_results

    open_causal_results(url, mode="r")


def check_view(store: str, results: str | None, explanations: str | None, host: str, port: int) -> None:
    """`effattn view`: the store opens, the results and explanations are of that store, and the port is free."""
    from flows.view import check_port_free
    from storage_schemas.store_view import StoreView

    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be 1..65535, got {port}")
    StoreView(store, results, explanations)
    check_port_free(host, port)


def check_corpus_and_model(
    corpus: str,
    model: str,
    text_column: str | None,
    label_column: str | None,
    task: str = "classification",
    train: bool = True,
) -> None:
    """The corpus parses, the model resolves and is supported for `task`, and a head can be trained where one
    would be (a single-class corpus is refused instead of silently keeping a random head)."""
    from analysis.corpora import load_corpus

    loaded_corpus = load_corpus(corpus, text_column=text_column, label_column=label_column)
    check_model_name(model)  # before torch and transformers are imported (seconds)
    from analysis.models import check_model, has_trained_head
    from analysis.training import head_to_train

    check_model(model, task)
    head_to_train(loaded_corpus, task, train, has_trained_head(model))


def check_command(command: str, settings: Any) -> None:
    """Run the checks of `effattn <command>` on its settings (flows.settings: ExtractSettings for extract, ...;
    PipelineSettings for run, ServeSettings for serve, whose pipeline's are checked as run's). inspect, verify and
    unlock: a remote store must answer; studies checks its own datasets. Checks that need only the arguments, the
    store's attributes, its lock or the corpus file come first; those that import torch or reach a cluster last."""
    if command in ("inspect", "verify", "unlock"):
        check_store_reachable(settings.store)
        if command == "verify" and settings.repair:
            check_writable_store(settings.store, "STORE")
            check_unlocked(settings.store)
        if command == "verify":
            check_dask_scheduler(settings.dask_address)
    elif command == "extract":
        check_writable_location(settings.store, "--store")
        check_max_length(settings.max_length)
        check_store_reachable(settings.store)
        check_writable_store(settings.store, "--store")
        check_unlocked(settings.store)
        check_existing_store_matches(settings)
        check_corpus_and_model(
            settings.corpus, settings.model, settings.text_column, settings.label_column, settings.task, settings.train
        )
        check_device(settings.device)
        check_dask_scheduler(settings.dask_address)
    elif command == "train":
        from analysis.corpora import load_corpus
        from analysis.models import check_model
        from analysis.training import check_trainable

        check_trainable(
            load_corpus(settings.corpus, text_column=settings.text_column, label_column=settings.label_column)
        )
        check_model(settings.model)
    elif command == "efficient":
        if settings.variants is not None:
            require_known_variants(settings.variants)
        group = check_attention_store(settings.store)
        from storage_schemas.attention_store import require_extracted

        require_extracted(group, settings.store, "efficient")
        check_writable_store(settings.store, "--store")
        check_unlocked(settings.store)
        check_dask_scheduler(settings.dask_address)
    elif command in ("causal", "explain"):
        check_writable_location(settings.results, "--results")
        check_store_reachable(settings.results)
        check_writable_store(settings.results, "--results")
        check_unlocked(settings.results)
        if command == "causal":
            check_causal_inputs(settings)
        else:
            check_explain_inputs(settings)
        if settings.model:
            check_model_name(settings.model)
            from analysis.models import check_model

            check_model(settings.model)
        check_device(settings.device)
        check_dask_scheduler(settings.dask_address)
    elif command == "report":
        check_writable_location(settings.out, "--out")
        check_causal_results(settings.results)
        if settings.store:
            check_attention_store(settings.store)
    elif command == "view":
        check_view(settings.store, settings.results, settings.explanations, settings.host, settings.port)
    elif command in ("run", "serve"):
        if command == "serve":  # without a server that answers, nothing else matters
            from flows.prefect_server import check_serving_server

            check_serving_server()
        if settings.variants is not None:
            require_known_variants(settings.variants)
        check_max_length(settings.max_length)
        for flag, name in (
            ("--run-dir", "run_dir"),
            ("--store", "store"),
            ("--results", "results"),
            ("--report-dir", "report_dir"),
        ):
            if getattr(settings, name):
                check_writable_location(getattr(settings, name), flag)
        check_corpus_and_model(
            settings.corpus, settings.model, settings.text_column, settings.label_column, settings.task, settings.train
        )
        check_device(settings.device)
        check_dask_scheduler(settings.dask_address)
