"""Extraction as plain functions: choose and tokenize examples, run the model with capture, pad the results.

`plan_extraction` decides which corpus rows are stored and in which order (sorted by token length, so a batch
pads little); `capture_examples` runs the model over one shard's examples in batches and returns its attention,
values and logits padded to the store's max_length, zero beyond each example's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC

import numpy as np
import torch

from analysis.architectures import key_bands_of, observe_layout
from analysis.attention_backend import CapturedLayer, capture_attention
from analysis.corpora import corpus_file_name
from analysis.key_bands import KeyBand
from analysis.models import LoadedModel, check_pooled_positions


@dataclass(frozen=True)
class ExtractionPlan:
    """Which corpus rows are stored, in stored order, with their tokens.

    tokens: [example, max_length] int32, right-padded with pad_id; length, untruncated_length: [example];
    source_index: [example] row in the corpus.
    """

    tokens: np.ndarray
    length: np.ndarray
    untruncated_length: np.ndarray
    source_index: np.ndarray
    max_length: int
    pad_id: int


def select_rows(n_rows: int, limit: int | None, seed: int) -> np.ndarray:
    """Corpus rows to use: all of them, or `limit` rows drawn without replacement by a seeded permutation
    (so that a limited run mixes the classes of a corpus stored by class). Returned sorted."""
    if limit is None or limit >= n_rows:
        return np.arange(n_rows)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return np.sort(np.random.default_rng(seed).permutation(n_rows)[:limit])


def rows_to_append(
    candidate_rows: np.ndarray, identities: np.ndarray, stored: np.ndarray, limit: int | None
) -> np.ndarray:
    """The corpus rows a store that grows still lacks, in corpus order.

    candidate_rows: int [k] the selected rows (the split), in corpus order; identities: uint8 [rows, 16] of the
    whole corpus (analysis.example_identities); stored: uint8 [stored, 16] the store's. A row whose identity the store
    holds, or that repeats an earlier row's, is left out; with `limit`, the store holds at most `limit` examples,
    the earliest rows first (rows only append, so the same earlier examples stay selected)."""
    known = {bytes(row) for row in np.asarray(stored, dtype=np.uint8)}
    wanted = []
    for row in np.asarray(candidate_rows, dtype=np.int64):
        key = bytes(identities[row])
        if key not in known:
            known.add(key)
            wanted.append(row)
    if limit is not None:
        wanted = wanted[: max(0, int(limit) - len(stored))]
    return np.asarray(wanted, dtype=np.int64)


def usable_max_length(model, requested: int) -> int:
    """`requested`, capped at the model's number of positions (`config.max_position_embeddings`): longer inputs do
    not run with absolute position embeddings (BERT) and leave the trained context otherwise. Texts longer than
    the result are truncated like any other (`untruncated_length` records it per example)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(int(requested), int(positions)) if positions else int(requested)


def plan_extraction(
    texts: Sequence[str],
    tokenizer,
    max_length: int,
    limit: int | None = None,
    seed: int = 0,
    candidate_rows: np.ndarray | None = None,
    pad_to: int | None = None,
) -> ExtractionPlan:
    """Tokenize the selected texts (truncating to `max_length` tokens) and sort them by length (stable).

    `candidate_rows` (default: every row) are the corpus rows to choose from, e.g. a held-out split; `limit`
    draws a seeded sample of them. The stored position dimension is the longest selected example, at most
    `max_length`; or `pad_to` (a store that grows keeps `max_length` positions, so that every later example fits).
    """
    if max_length < 2:
        raise ValueError(f"--max-length must be at least 2 tokens, got {max_length}")
    candidates = np.arange(len(texts)) if candidate_rows is None else np.asarray(candidate_rows)
    if len(candidates) == 0:
        raise ValueError("no examples to extract: the chosen split of the corpus is empty")
    rows = candidates[select_rows(len(candidates), limit, seed)]
    encoded = tokenizer([texts[row] for row in rows], add_special_tokens=True, truncation=False)["input_ids"]
    untruncated = np.array([len(ids) for ids in encoded], dtype=np.int64)
    truncated = [_truncate(ids, max_length, tokenizer) for ids in encoded]
    length = np.array([len(ids) for ids in truncated], dtype=np.int64)
    order = np.argsort(length, kind="stable")
    stored_length = int(length.max()) if pad_to is None else int(pad_to)
    if stored_length < int(length.max()):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest selected example ({int(length.max())} tokens)")
    pad_id = tokenizer.pad_token_id
    tokens = np.full((len(rows), stored_length), pad_id, dtype=np.int32)
    for stored_row, source_row in enumerate(order):
        tokens[stored_row, : length[source_row]] = truncated[source_row]
    return ExtractionPlan(
        tokens=tokens,
        length=length[order],
        untruncated_length=untruncated[order],
        source_index=rows[order],
        max_length=stored_length,
        pad_id=pad_id,
    )


def _truncate(ids: list[int], max_length: int, tokenizer) -> list[int]:
    """Cut a token list to max_length, keeping a final special token (e.g. BERT's [SEP]) in place."""
    if len(ids) <= max_length:
        return ids
    last = ids[-1]
    if last in tokenizer.all_special_ids:
        return ids[: max_length - 1] + [last]
    return ids[:max_length]


@dataclass
class CapturedShard:
    """attention: [example, layer, head, L, L]; value: [example, layer, kv_head, L, head_dim] (storage dtype);
    logits: [example, class] float32, or for next-token the top-k logits [example, L, top_k] with
    logit_ids [example, L, top_k] int32 and logsumexp [example, L] float32. Zero beyond each example's length."""

    attention: np.ndarray
    value: np.ndarray
    logits: np.ndarray
    logit_ids: np.ndarray | None = None
    logsumexp: np.ndarray | None = None


def next_token_summary(logits: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """logits [batch, position, vocab] -> top_k values and ids [batch, position, top_k] (largest first) and the
    logsumexp [batch, position], enough for top-1 agreement and log-probabilities of the kept tokens."""
    values, ids = torch.topk(logits.float(), k=top_k, dim=-1)
    return {"logits": values, "logit_ids": ids.int(), "logsumexp": torch.logsumexp(logits.float(), dim=-1)}


def real_token_mask(length: np.ndarray, size: int) -> np.ndarray:
    """[example, size] bool: True at positions < length."""
    return np.arange(size)[None, :] < np.asarray(length)[:, None]


@torch.inference_mode()
def forward_with_capture(
    loaded: LoadedModel, tokens: np.ndarray, length: np.ndarray
) -> tuple[list[CapturedLayer], torch.Tensor]:
    """One forward pass with capture over a batch trimmed to its longest example, Lb = max(length).

    tokens: [batch, >= Lb] int, right-padded; length: [batch].
    Returns the captured layers in order (attention [batch, head, Lb, Lb], value [batch, kv_head, Lb, head_dim],
    padding NOT removed) and the logits ([batch, class], or [batch, Lb, vocab] for next-token).
    """
    check_pooled_positions(loaded, tokens, length)
    batch_length = int(np.max(length))
    input_ids = torch.as_tensor(tokens[:, :batch_length], dtype=torch.long, device=loaded.device)
    mask = torch.as_tensor(real_token_mask(length, batch_length), device=loaded.device).long()
    with capture_attention() as recorder:
        logits = loaded.model(input_ids=input_ids, attention_mask=mask).logits
    return recorder.ordered(loaded.shape.layers), logits


def capture_examples(
    loaded: LoadedModel,
    tokens: np.ndarray,
    length: np.ndarray,
    batch_size: int,
    dtype: str = "float32",
    top_k: int = 10,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    kv_heads: Sequence[int] | None = None,
) -> CapturedShard:
    """Run the model over one shard's examples in batches; results padded to L = tokens.shape[1].

    tokens: [example, L] int (right-padded); length: [example]. Examples should be sorted by length so that
    batches pad little (the store keeps them so). Only each example's real block is copied out of the model's
    tensors, so everything beyond its length stays exactly zero.
    layers, heads, kv_heads: model indices of what is kept (a store's selection; None: all), in that order along
    the captured layer / head / kv_head dims; the rest is dropped on the model's device, never copied off it.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    n_examples, L = tokens.shape
    shape = loaded.shape
    layers = list(range(shape.layers)) if layers is None else list(layers)
    heads = list(range(shape.heads)) if heads is None else list(heads)
    kv_heads = list(range(shape.kv_heads)) if kv_heads is None else list(kv_heads)
    attention = np.zeros((n_examples, len(layers), len(heads), L, L), dtype=dtype)
    value = np.zeros((n_examples, len(layers), len(kv_heads), L, shape.head_dim), dtype=dtype)
    if loaded.task == "next-token":
        predictions = {
            "logits": np.zeros((n_examples, L, top_k), dtype=np.float32),
            "logit_ids": np.zeros((n_examples, L, top_k), dtype=np.int32),
            "logsumexp": np.zeros((n_examples, L), dtype=np.float32),
        }
    else:
        predictions = {"logits": np.zeros((n_examples, loaded.model.config.num_labels), dtype=np.float32)}
    for start in range(0, n_examples, batch_size):
        batch_lengths = length[start : start + batch_size]
        captured, logits = forward_with_capture(loaded, tokens[start : start + batch_size], batch_lengths)
        for layer_index, model_layer in enumerate(layers):
            layer = captured[model_layer]
            head_index = torch.as_tensor(heads, device=layer.attention.device)
            kv_index = torch.as_tensor(kv_heads, device=layer.value.device)
            layer_attention = layer.attention.index_select(1, head_index).float().cpu().numpy()
            layer_value = layer.value.index_select(1, kv_index).float().cpu().numpy()
            for offset, n in enumerate(batch_lengths):
                attention[start + offset, layer_index, :, :n, :n] = layer_attention[offset, :, :n, :n]
                value[start + offset, layer_index, :, :n] = layer_value[offset, :, :n]
        if loaded.task == "next-token":
            summary = {name: array.cpu().numpy() for name, array in next_token_summary(logits, top_k).items()}
            for offset, n in enumerate(batch_lengths):
                for name, array in summary.items():
                    predictions[name][start + offset, :n] = array[offset, :n]
        else:
            predictions["logits"][start : start + len(batch_lengths)] = logits.float().cpu().numpy()
    return CapturedShard(attention=attention, value=value, **predictions)


def observe_key_bands(loaded: LoadedModel, length: int) -> tuple[KeyBand, ...]:
    """Each layer's band of visible keys, read from the masks its attention receives in one probe of `length`
    tokens (the store's longest example): exact for every example of the store, whatever the family means by its
    `sliding_window` argument. A mask that is not a band raises analysis.architectures.ArchitectureError."""
    with torch.inference_mode():
        observed = observe_layout(loaded.model, max(int(length), 2))
    bands = key_bands_of(loaded.model, observed)
    if len(bands) != loaded.shape.layers:
        raise RuntimeError(f"the key-band probe saw {len(bands)} attention calls for {loaded.shape.layers} layers")
    return bands


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the stored numbers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("effattn", "torch", "transformers", "zarr", "numcodecs", "numpy", "xarray", "dask", "prefect"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def store_attributes(
    loaded: LoadedModel,
    corpus,
    plan: ExtractionPlan,
    requested_max_length: int,
    limit: int | None,
    dtype: str,
    seed: int,
    top_k: int = 0,
    split: str = "all",
    head: dict | None = None,
) -> dict:
    """Provenance for the root attributes of an attention store (JSON-serialisable)."""
    from datetime import datetime

    config = loaded.model.config
    tokenizer = loaded.tokenizer
    return {
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "architecture": type(loaded.model).__name__,
            "model_type": loaded.model.config.model_type,
            "adapter": loaded.adapter.name,
            "causal": loaded.causal,
            "sliding_windows": list(loaded.sliding_windows),
            "key_bands": [band.to_attribute() for band in observe_key_bands(loaded, plan.max_length)],
            "layers": loaded.shape.layers,
            "heads": loaded.shape.heads,
            "kv_heads": loaded.shape.kv_heads,
            "head_dim": loaded.shape.head_dim,
            "hidden": loaded.shape.hidden,
            "num_labels": int(config.num_labels) if loaded.task == "classification" else None,
            "head_seed": seed,
            "weights_digest": loaded.weights_digest,
            "head": head or {"trained": False},
        },
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": int(len(tokenizer)),
            "pad_token_id": int(plan.pad_id),
            "padding_side": "right",
        },
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "digest": corpus.digest,
            "split": split,
            "corpus_size": len(corpus.texts),
            "dropped_empty": int(corpus.dropped_empty),
            "class_names": list(corpus.class_names),
            "selection": {"split": split, "limit": limit, "seed": seed},
            "columns": list(corpus.columns) if corpus.columns else None,
            "file_name": corpus_file_name(corpus),
            "example_count": int(len(plan.length)),
        },
        "extraction": {
            "task": loaded.task,
            "top_k": int(top_k),
            "requested_max_length": int(requested_max_length),
            "truncated_examples": int(np.sum(plan.untruncated_length > plan.length)),
        },
        "max_length": int(plan.max_length),
        "dtype": dtype,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_versions": package_versions(),
    }
