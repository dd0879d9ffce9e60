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

__all__ = ["IDENTITY_BYTES", "identity_digests", "identity_hex", "keyed_share"]

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


def identity_hex(identity: np.ndarray) -> str:
    """One identity (`uint8 [IDENTITY_BYTES]`) as 32 hex digits."""
    return bytes(np.asarray(identity, dtype=np.uint8)).hex()


def keyed_share(identities: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """`float64 [n]` in [0, 1): a keyed hash of each identity (`uint8 [n, IDENTITY_BYTES]`), blake2b keyed with the
    purpose and the seed, read as a fraction. Every per-example draw of a store that grows uses it (the held-out
    split, the examples measured at the layer and head scopes, the examples explained): an example's draw depends
    on its identity alone, so growth never changes an earlier example's."""
    key = f"effattn:{purpose}:{int(seed)}".encode()
    identities = np.asarray(identities, dtype=np.uint8).reshape(-1, IDENTITY_BYTES)
    shares = np.empty(len(identities), dtype=np.float64)
    for row, identity in enumerate(identities):
        digest = hashlib.blake2b(identity.tobytes(), key=key, digest_size=8).digest()
        shares[row] = int.from_bytes(digest, "big") / 2.0**64
    return shares
