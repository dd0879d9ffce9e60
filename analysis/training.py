"""Fine-tuning a sequence classifier on a corpus, reproducibly, and the on-disk cache of trained heads.

No bundled model has a trained classification head, so the pipeline trains its own: the base encoder and a
fresh head (initialised from ``settings.seed``) are fine-tuned together with AdamW and a linear warmup/decay
schedule on the fixed "train" split of :mod:`analysis.splits`, and evaluated on its "held_out" split: the
permutation split for bundled corpora, the growth-stable keyed split for growable ones (user files and folders,
``Corpus.growable``), the same rows extraction selects (:func:`training_split`).

The result is a plain Hugging Face folder (``save_pretrained``, safetensors, never pickle) that
:func:`analysis.models.load_model` loads like any other, plus ``model_card.json`` (provenance, settings, split
sizes, held-out accuracy against the majority-class baseline, timings). The card is written last and atomically,
so a folder with a card is complete; a folder without one (a crash mid-save) is never taken as a cache hit.

Cache layout: ``<cache root>/heads/<key>/`` with
``key = head_cache_key(base digest, corpus digest, settings, growable=corpus.growable)``;
the cache root is ``$EFFATTN_CACHE`` or ``~/.cache/effattn``.

Determinism: seeds fixed (numpy for the split, sampling and batch order; torch for the head and dropout, in a
forked RNG so the caller's global RNG is untouched), deterministic algorithms requested while training. Two runs
on the same inputs, machine and thread count give the same weights digest on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from analysis.corpora import Corpus, example_identities
from analysis.models import load_model, weights_digest
from analysis.splits import STABLE_SPLIT_METHOD, split_rows
from analysis.training_settings import TrainingSettings

__all__ = [
    "CACHE_ENV_VAR",
    "MODEL_CARD_FILE",
    "TrainingSettings",
    "cached_model_card",
    "check_trainable",
    "head_to_train",
    "default_cache_root",
    "head_cache_key",
    "train_classifier",
    "trained_head_folder",
    "training_split",
]

CACHE_ENV_VAR = "EFFATTN_CACHE"
MODEL_CARD_FILE = "model_card.json"
CARD_SCHEMA = "effattn-trained-head"
CARD_VERSION = 1
_KEY_VERSION = "effattn-head-key-v1"
# In the cache key of a growable corpus only (bundled keys stay as they were): its split is the keyed one.
_STABLE_SPLIT_KEY_TAG = "stable-keyed-v1"
PERMUTATION_SPLIT_METHOD = (
    "analysis.splits.split_indices (stratified by label, numpy default_rng(seed); whole groups when the corpus has "
    "groups)"
)
# Keys a card must have to count as complete (a cache hit).
_REQUIRED_CARD_KEYS = ("schema", "version", "base_model", "corpus", "settings", "held_out_accuracy", "weights_digest")


def check_trainable(corpus: Corpus) -> None:
    """Raise ValueError unless `corpus` has at least two classes with labelled examples."""
    n_labelled = int(np.sum(np.asarray(corpus.labels) >= 0))
    if not corpus.class_names or n_labelled == 0:
        raise ValueError(
            f"cannot train a classifier on an unlabelled corpus ({corpus.name!r} has no labels): pass a corpus "
            "with a label column (--label-column COLUMN), or use a model that already has a trained head"
        )
    if len(corpus.class_names) < 2:
        raise ValueError(
            f"cannot train a classifier on corpus {corpus.name!r}: it has a single class "
            f"{corpus.class_names[0]!r}; a classifier needs at least two. Add examples of another class, pass "
            "--label-column none to use the corpus unlabelled, or --no-train to keep a random head (smoke tests only)"
        )


def head_to_train(corpus: Corpus, task: str, train: bool, model_has_trained_head: bool) -> bool:
    """Whether a classification head is fine-tuned on `corpus` before extraction: classification of a corpus of two
    or more classes, with a model that has no trained head, unless `train` is False. An unlabelled corpus keeps a
    random head. A single-class corpus would silently keep a random head too, so it is refused (ValueError)."""
    if not train or task != "classification" or model_has_trained_head:
        return False
    if len(corpus.class_names) == 1:
        check_trainable(corpus)  # raises: one class
    return len(corpus.class_names) >= 2


def head_cache_key(
    base_weights_digest: str, corpus_digest: str, settings: TrainingSettings, growable: bool = False
) -> str:
    """sha256 hex of a canonical JSON of (base weights digest, corpus digest, settings[, split method]).

    The base digest is that of the model as :func:`analysis.models.load_model` returns it for this corpus's
    number of classes and ``settings.seed`` (so the initial head is covered); the split follows from the corpus,
    ``settings.held_out_fraction`` / ``settings.seed`` and the split method. Pass ``growable=corpus.growable``:
    a growable corpus is split by the keyed method (:func:`training_split`), which the key then names; for a
    bundled corpus (False) the key is what it always was.
    """
    payload = {
        "key_version": _KEY_VERSION,
        "base_weights_digest": base_weights_digest,
        "corpus_digest": corpus_digest,
        "settings": settings.as_dict(),
    }
    if growable:
        payload["split_method"] = _STABLE_SPLIT_KEY_TAG
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def training_split(corpus: Corpus, settings: TrainingSettings) -> dict[str, np.ndarray]:
    """The train / held-out rows a head is trained and scored on: ``{"train": int64 [n_train], "held_out":
    int64 [n_held_out]}`` (all rows, whatever their label), as analysis.splits.select_split gives extraction.

    Bundled corpora: the permutation split (analysis.splits.split_indices). Growable corpora (user files and
    folders): the keyed split of their example identities (analysis.splits.stable_split_indices), so an example
    held out by extraction is never trained on, however the corpus grows.
    """
    identities = example_identities(corpus) if corpus.growable else None
    return split_rows(
        len(corpus),
        np.asarray(corpus.labels, dtype=np.int64),
        settings.held_out_fraction,
        settings.seed,
        groups=corpus.groups,
        identities=identities,
    )


def default_cache_root() -> Path:
    """``$EFFATTN_CACHE`` if set (and not empty), else ``~/.cache/effattn``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "effattn"


def trained_head_folder(cache_root: Path, key: str) -> Path:
    """Where the head with cache key `key` lives: ``<cache_root>/heads/<key>``."""
    if not key or any(sep in key for sep in ("/", "\\")) or key.startswith("."):
        raise ValueError(f"not a cache key: {key!r}")
    return Path(cache_root) / "heads" / key


def cached_model_card(folder: Path) -> dict | None:
    """The model card of a complete trained-head folder, or None (no folder, no card, an unreadable or
    incomplete card, or no weights file)."""
    folder = Path(folder)
    card_path = folder / MODEL_CARD_FILE
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("schema") != CARD_SCHEMA:
        return None
    if any(key not in card for key in _REQUIRED_CARD_KEYS):
        return None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return card


def write_json_atomically(path: Path, content: dict) -> None:
    """Write `content` as JSON to a temporary file beside `path`, flush it to disk, then os.replace it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------
# tokenization and batching


def _tokenize(texts: list[str], tokenizer, max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids truncated to max_length (a final special token such as [SEP] kept in place), and the untruncated
    lengths (to count truncated examples). Same truncation as analysis.extraction."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    previous = logger.level
    logger.setLevel(logging.ERROR)  # "sequence longer than the model maximum": we truncate ourselves
    try:
        encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    finally:
        logger.setLevel(previous)
    special = set(tokenizer.all_special_ids)
    untruncated = np.array([len(ids) for ids in encoded], dtype=np.int64)
    truncated = []
    for ids in encoded:
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [ids[-1]] if ids[-1] in special else ids[:max_length]
        truncated.append(list(ids))
    return truncated, untruncated


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example of the batch: (input_ids, attention_mask), both [batch, Lb] long."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def _epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions 0..n-1 grouped into batches: a seeded shuffle, then within pools of 50 batches sorted by length
    (so a batch pads little), then the batch order shuffled."""
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _label_counts(labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, int]:
    counts = {name: int(np.sum(labels == index)) for index, name in enumerate(class_names)}
    unknown = int(np.sum(labels < 0))
    if unknown:
        counts["<unknown>"] = unknown
    return counts


@contextlib.contextmanager
def _deterministic_torch(seed: int):
    """Seeded torch RNG (forked: the caller's RNG state comes back) and deterministic algorithms, for a block."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


@torch.no_grad()
def _predict(model, tokens: list[list[int]], pad_id: int, batch_size: int, device: str, progress: bool) -> np.ndarray:
    """Predicted class per example (batches sorted by length)."""
    from tqdm.auto import tqdm

    model.eval()
    predictions = np.zeros(len(tokens), dtype=np.int64)
    order = np.argsort([len(ids) for ids in tokens], kind="stable")
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="evaluate held-out", unit="batch", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        input_ids, mask = _pad([tokens[row] for row in rows], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        predictions[rows] = logits.argmax(-1).cpu().numpy()
    return predictions


# --------------------------------------------------------------------------------------
# training


def train_classifier(
    base: str,
    corpus: Corpus,
    settings: TrainingSettings,
    output_folder: Path,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Fine-tune `base` (encoder and a fresh head) on the train split of `corpus`; save it to `output_folder`.

    Args:
        base: a bundled model name (e.g. "minilm") or a local Hugging Face folder without a trained head.
        corpus: a labelled corpus with at least two classes (examples with label -1 are split like the others
            but neither trained on nor scored).
        settings: see :class:`TrainingSettings`.
        output_folder: created if needed; receives the model (safetensors), its tokenizer and, last and
            atomically, ``model_card.json``.
        progress: show tqdm bars over batches.
        device: torch device to train on.

    Returns:
        The model card (also written to ``output_folder/model_card.json``).

    Raises:
        ValueError: an unlabelled or single-class corpus, or an unknown / unsupported base model.
    """
    check_trainable(corpus)
    # Seeded torch RNG for the head initialisation and dropout, forked so the caller's RNG state comes back.
    with _deterministic_torch(settings.seed):
        return _train(base, corpus, settings, Path(output_folder), progress, device)


def _train(
    base: str, corpus: Corpus, settings: TrainingSettings, output_folder: Path, progress: bool, device: str
) -> dict:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    started = datetime.now(UTC)
    class_names = tuple(corpus.class_names)
    labels = np.asarray(corpus.labels, dtype=np.int64)

    split = training_split(corpus, settings)
    train_rows = split["train"][labels[split["train"]] >= 0]
    held_out_rows = split["held_out"][labels[split["held_out"]] >= 0]
    train_split_size = len(train_rows)
    if settings.max_train_examples is not None and settings.max_train_examples < len(train_rows):
        sample_rng = np.random.default_rng([settings.seed, 1])
        train_rows = np.sort(sample_rng.permutation(train_rows)[: settings.max_train_examples])
    if len(train_rows) == 0:
        raise ValueError(f"corpus {corpus.name!r} has no labelled example in its train split")

    loaded = load_model(base, num_labels=len(class_names), device=device, seed=settings.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    base_digest = loaded.weights_digest
    # Training needs no capture; the fused kernel is faster. The saved folder is reloaded with load_model later,
    # which switches it back to the effattn backend.
    model.set_attn_implementation("sdpa")
    model.config.id2label = dict(enumerate(class_names))
    model.config.label2id = {name: index for index, name in enumerate(class_names)}
    pad_id = tokenizer.pad_token_id

    train_tokens, train_untruncated = _tokenize([corpus.texts[r] for r in train_rows], tokenizer, settings.max_length)
    held_tokens, held_untruncated = _tokenize([corpus.texts[r] for r in held_out_rows], tokenizer, settings.max_length)
    train_labels = torch.as_tensor(labels[train_rows], dtype=torch.long)
    train_lengths = np.array([len(ids) for ids in train_tokens], dtype=np.int64)

    batch_rng = np.random.default_rng([settings.seed, 2])
    steps_per_epoch = -(-len(train_rows) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = int(settings.warmup_fraction * total_steps)
    epoch_losses: list[float] = []
    threads = torch.get_num_threads()

    torch.manual_seed(settings.seed)  # dropout: the same masks whatever loading consumed
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n or "norm" in n]
    no_decay_ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in no_decay_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        foreach=False,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    train_start = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        batches = _epoch_batches(train_lengths, settings.batch_size, batch_rng)
        loss_sum, seen = 0.0, 0
        bar = tqdm(batches, desc=f"train epoch {epoch + 1}/{settings.epochs}", unit="batch", disable=not progress)
        for batch in bar:
            input_ids, mask = _pad([train_tokens[i] for i in batch], pad_id)
            output = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                labels=train_labels[batch].to(device),
            )
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += float(output.loss.detach()) * len(batch)
            seen += len(batch)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        epoch_losses.append(loss_sum / seen)
    train_seconds = time.perf_counter() - train_start

    eval_start = time.perf_counter()
    predictions = _predict(model, held_tokens, pad_id, settings.batch_size * 2, device, progress)
    eval_seconds = time.perf_counter() - eval_start
    model.eval()

    held_labels = labels[held_out_rows]
    accuracy = float(np.mean(predictions == held_labels)) if len(held_labels) else None
    train_counts = np.bincount(labels[train_rows], minlength=len(class_names))
    majority = int(np.argmax(train_counts))  # the baseline predicts the train split's most frequent class
    majority_accuracy = float(np.mean(held_labels == majority)) if len(held_labels) else None
    confusion = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    np.add.at(confusion, (held_labels, predictions), 1)

    model = model.to("cpu")
    trained_digest = weights_digest(model)
    output_folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_folder, safe_serialization=True)
    tokenizer.save_pretrained(output_folder)

    card = {
        "schema": CARD_SCHEMA,
        "version": CARD_VERSION,
        "created": started.isoformat(),
        "base_model": {"name": base, "source": loaded.source, "weights_digest": base_digest},
        "corpus": {
            "name": corpus.name,
            "digest": corpus.digest,
            "source": corpus.source,
            "class_names": list(class_names),
            "n_examples": len(corpus),
        },
        "settings": settings.as_dict(),
        "cache_key": head_cache_key(base_digest, corpus.digest, settings, growable=corpus.growable),
        "split": {
            "method": STABLE_SPLIT_METHOD if corpus.growable else PERMUTATION_SPLIT_METHOD,
            "held_out_fraction": settings.held_out_fraction,
            "seed": settings.seed,
            "sizes": {"train": int(len(split["train"])), "held_out": int(len(split["held_out"]))},
            "train_split_labelled": int(train_split_size),
            "trained_on": int(len(train_rows)),
            "scored_held_out": int(len(held_out_rows)),
            "label_distribution": {
                "train": _label_counts(labels[split["train"]], class_names),
                "trained_on": _label_counts(labels[train_rows], class_names),
                "held_out": _label_counts(labels[split["held_out"]], class_names),
            },
        },
        "truncation": {
            "max_length": settings.max_length,
            "train_truncated": int(np.sum(train_untruncated > settings.max_length)),
            "held_out_truncated": int(np.sum(held_untruncated > settings.max_length)),
            "train_median_tokens": float(np.median(train_untruncated)),
        },
        "held_out_accuracy": accuracy,
        "majority_baseline": {
            "class": class_names[majority],
            "held_out_accuracy": majority_accuracy,
        },
        "held_out_confusion": {"rows": "true class", "columns": "predicted class", "matrix": confusion.tolist()},
        "train_loss_per_epoch": epoch_losses,
        "steps": {"total": total_steps, "warmup": warmup_steps, "per_epoch": steps_per_epoch},
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "torch_threads": threads,
        "device": device,
        "versions": _versions(),
        "weights_digest": trained_digest,
        "files": sorted(p.name for p in output_folder.iterdir() if not p.name.startswith(".")),
    }
    write_json_atomically(output_folder / MODEL_CARD_FILE, card)  # last: a card means a complete folder
    return card


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "numpy", "tokenizers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def trained_head_provenance(model: str) -> dict:
    """What a store records of the head that produced its logits: {"trained": False} for a registry name or a
    folder without a complete model card; else the card's path, base model, held-out accuracy and settings."""
    folder = Path(model)
    card = cached_model_card(folder) if folder.is_dir() else None
    if card is None:
        return {"trained": False}
    return {
        "trained": True,
        "model_card": str(folder / "model_card.json"),
        "base_model": card["base_model"]["name"],
        "held_out_accuracy": card["held_out_accuracy"],
        "settings": card["settings"],
    }
