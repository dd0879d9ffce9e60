"""What makes an example the same example across runs: a digest of its text and its label name.

A store that grows (a scheduled run over a corpus that grows) keeps every stored example's identity, so that a rerun
finds the examples it already holds and extracts only the others. The identity covers the text and the label *name*
(never the class id, which shifts when a new class name appears), not the row: a row moved within the file is the
same example, a row edited in place is a new one, and two rows with the same text and label are one example.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

__all__ = [
    "IDENTITY_BYTES",
    "check_identities",
    "first_occurrences",
    "identity_digests",
    "identity_hex",
    "keyed_share",
    "seed_keys",
    "share_for_count",
]

IDENTITY_BYTES = 16  # 128 bits: collisions are out of reach for any corpus
_IDENTITY_VERSION = b"effattn-example-v1\n"


def identity_digests(texts: Sequence[str], label_names: Sequence[str | None]) -> np.ndarray:
    """`uint8 [n, IDENTITY_BYTES]`: row i is the first bytes of sha256 over a version tag and the JSON
    `[text_i, label_name_i]` (null for an unknown label)."""
    if len(texts) != len(label_names):
        raise ValueError(f"{len(texts)} texts but {len(label_names)} label names: give one label name per text")
    digests = np.zeros((len(texts), IDENTITY_BYTES), dtype=np.uint8)
    for row, (text, label) in enumerate(zip(texts, label_names, strict=True)):
        digest = hashlib.sha256(_IDENTITY_VERSION + json.dumps([text, label], ensure_ascii=False).encode("utf-8"))
        digests[row] = np.frombuffer(digest.digest()[:IDENTITY_BYTES], dtype=np.uint8)
    return digests


def check_identities(identities: np.ndarray, what: str = "identities") -> np.ndarray:
    """`identities` as a contiguous `uint8 [n, IDENTITY_BYTES]` array; ValueError naming `what` otherwise."""
    identities = np.asarray(identities)
    if identities.ndim != 2 or identities.shape[1] != IDENTITY_BYTES or identities.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 [n_examples, {IDENTITY_BYTES}] (analysis.corpora.example_identities), got "
            f"{identities.dtype} {identities.shape}"
        )
    return np.ascontiguousarray(identities)


def identity_hex(identity_row: np.ndarray) -> str:
    """One identity (``uint8 [IDENTITY_BYTES]``) as 32 lowercase hex digits."""
    row = np.asarray(identity_row, dtype=np.uint8)
    if row.shape != (IDENTITY_BYTES,):
        raise ValueError(f"an example identity is uint8 [{IDENTITY_BYTES}], got shape {row.shape}: pass one row")
    return row.tobytes().hex()


def first_occurrences(identities: np.ndarray) -> np.ndarray:
    """``int64 [k]``: the row of the first occurrence of each distinct identity, in corpus order (increasing).
    Duplicates (same text and label) are one example for growth; keeping these rows drops the later copies.

    Args:
        identities: ``uint8 [n, IDENTITY_BYTES]``.
    """
    identities = check_identities(identities)
    keys = identities.view(f"V{IDENTITY_BYTES}").ravel()
    _, first = np.unique(keys, return_index=True)
    return np.sort(first).astype(np.int64)


def keyed_share(identities: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """A uniform draw in [0, 1) per example that depends only on its identity, the seed and the purpose.

    ``blake2b(identity bytes, key=f"effattn:{purpose}:{seed}", digest_size=8)`` read as a big-endian uint64 and
    scaled by ``2**-64``; only its top 53 bits are kept (the float64 mantissa), so the share is exactly
    representable and never rounds up to 1.0. Every per-example choice (the split, which examples are explained,
    layer/head-scope examples) draws from this with its own `purpose`, so adding examples never changes an
    earlier example's draw, and two purposes are independent.

    Args:
        identities: ``uint8 [n, IDENTITY_BYTES]``.
        seed: an int (part of the key).
        purpose: a short name of the choice, e.g. ``"split"`` (part of the key).

    Returns:
        ``float64 [n]`` in [0, 1).
    """
    identities = check_identities(identities)
    key = f"effattn:{purpose}:{int(seed)}".encode()
    if len(key) > hashlib.blake2b.MAX_KEY_SIZE:
        raise ValueError(
            f"purpose {purpose!r} is too long for a blake2b key ({len(key)} bytes with the seed, at most "
            f"{hashlib.blake2b.MAX_KEY_SIZE}): use a short purpose name"
        )
    digests = b"".join(hashlib.blake2b(row.tobytes(), key=key, digest_size=8).digest() for row in identities)
    words = np.frombuffer(digests, dtype=">u8").astype(np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def share_for_count(shares: np.ndarray, count: int | None) -> float:
    """The share below which exactly `count` of `shares` (float64 [n], keyed_share draws) fall: halfway between the
    count-th and the next smallest draw; 1.0 (everything) when count is None or at least n.

    A growing store fixes this share once (when its results are created), then chooses every example, the later
    ones too, by `keyed_share(...) < share`: `count` examples at first, about count / n of those added later.
    """
    ordered = np.sort(np.asarray(shares, dtype=np.float64))
    if count is None or int(count) >= len(ordered):
        return 1.0
    if int(count) <= 0:
        return 0.0
    return float((ordered[int(count) - 1] + ordered[int(count)]) / 2)


def seed_keys(identities: np.ndarray) -> np.ndarray:
    """``int64 [n]``: what seeds an example's random draws (noise interventions, the random ranking, sampled simplex
    rows) in a store that grows, in place of its store index: the first 8 identity bytes, big-endian, shifted to 63
    bits. The same example gets the same draws in every store, whatever its index (a store made from scratch sorts
    its examples otherwise).

    Args:
        identities: ``uint8 [n, IDENTITY_BYTES]``.
    """
    identities = check_identities(identities)
    return (identities[:, :8].copy().view(">u8").ravel() >> np.uint64(1)).astype(np.int64)
