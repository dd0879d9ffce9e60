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

from storage_schemas.remote import is_remote
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
    why = (f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None
           else "no CUDA device is visible to torch")
    raise ValueError(f"--device cuda: {why}: run with --device cpu, or on a machine with a GPU and a CUDA build of "
                     "torch. Nothing was written")


def check_dask_scheduler(address: str | None) -> None:
    """Refuse a `--dask-address` where no scheduler answers (connects, then disconnects)."""
    if address:
        connect_dask_scheduler(address).close()


def check_attention_store(url: str) -> None:
    """Refuse a store that is absent or not a valid attention store (the message says how to make one)."""
    from storage_schemas.attention_store import open_attention_store

    open_attention_store(url, mode="r")


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


def check_corpus_and_model(corpus: str, model: str, text_column: str | None, label_column: str | None,
                           task: str = "classification", train: bool = True) -> None:
    """The corpus parses, the model resolves and is supported for `task`, and a head can be trained where one
    would be (a single-class corpus is refused instead of silently keeping a random head)."""
    from analysis.corpora import load_corpus

    loaded_corpus = load_corpus(corpus, text_column=text_column, label_column=label_column)
    from analysis.models import check_model, has_trained_head
    from analysis.training import head_to_train

    check_model(model, task)
    head_to_train(loaded_corpus, task, train, has_trained_head(model))


def check_command(command: str, settings: Any) -> None:
    """Run the checks of `effattn <command>` on its settings (flows.settings: ExtractSettings for extract, ...;
    PipelineSettings for run and serve). Commands that start no Prefect flow (inspect, verify, unlock) need none;
    studies checks its own datasets."""
    if command == "extract":
        check_writable_location(settings.store, "--store")
        check_corpus_and_model(settings.corpus, settings.model, settings.text_column, settings.label_column,
                               settings.task, settings.train)
        check_device(settings.device)
        check_dask_scheduler(settings.dask_address)
    elif command == "train":
        from analysis.corpora import load_corpus
        from analysis.models import check_model
        from analysis.training import check_trainable

        check_trainable(load_corpus(settings.corpus, text_column=settings.text_column,
                                    label_column=settings.label_column))
        check_model(settings.model)
    elif command == "efficient":
        check_attention_store(settings.store)
        check_dask_scheduler(settings.dask_address)
    elif command in ("causal", "explain"):
        check_writable_location(settings.results, "--results")
        check_attention_store(settings.store)
        if settings.model:
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
        for flag, name in (("--run-dir", "run_dir"), ("--store", "store"), ("--results", "results"),
                           ("--report-dir", "report_dir")):
            if getattr(settings, name):
                check_writable_location(getattr(settings, name), flag)
        check_corpus_and_model(settings.corpus, settings.model, settings.text_column, settings.label_column,
                               settings.task, settings.train)
        check_device(settings.device)
        check_dask_scheduler(settings.dask_address)
