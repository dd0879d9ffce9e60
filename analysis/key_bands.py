"""Which keys each query may see: the band around the diagonal that a layer's attention mask allows.

A `KeyBand(left, right)` says that query i sees exactly the keys j with i - left <= j <= i + right (None: no bound
that way). Full bidirectional attention is KeyBand(None, None), causal attention KeyBand(None, 0), mistral's
sliding window w KeyBand(w - 1, 0), a ModernBERT local layer with `local_attention` 2w KeyBand(w, w).

The band is observed, not inferred from a `sliding_window` argument (whose meaning differs by family): extraction
runs one probe at the store's length and reads the mask each layer's attention received (`band_of_visible`); it is
stored per layer as the root attribute `model.key_bands`. A reach of at least the probed length - 1 is recorded as
None: for every length the store holds, all keys that way are visible. Stores written before carry no
`model.key_bands`; `store_key_bands` then gives the rule they were computed with (causal: the prefix; otherwise every
key), which is exact for models without windows.

Plain numpy (storage_schemas reads it): shapes are written in every signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeyBand:
    """Query i sees the keys j with i - left <= j <= i + right; None: unbounded that way."""

    left: int | None
    right: int | None

    def __post_init__(self) -> None:
        for name, reach in (("left", self.left), ("right", self.right)):
            if reach is not None and (not isinstance(reach, (int, np.integer)) or reach < 0):
                raise ValueError(f"a key band's {name} reach must be a non-negative integer or None, got {reach!r}")

    def within(self, length: int) -> KeyBand:
        """The same band for blocks of `length` rows: a reach of length - 1 or more is unbounded (None)."""

        def clip(reach):
            return None if reach is None or reach >= length - 1 else int(reach)

        return KeyBand(clip(self.left), clip(self.right))

    def visible(self, length: int) -> np.ndarray:
        """(length, length) bool: [query i, key j] True where i - left <= j <= i + right."""
        offset = np.arange(length)[None, :] - np.arange(length)[:, None]  # j - i
        inside = np.ones((length, length), dtype=bool)
        if self.left is not None:
            inside &= offset >= -self.left
        if self.right is not None:
            inside &= offset <= self.right
        return inside

    def window(self, query: int, length: int) -> tuple[int, int]:
        """[start, stop) of the keys query `query` sees in a block of `length` keys."""
        start = 0 if self.left is None else max(0, query - self.left)
        stop = length if self.right is None else min(length, query + self.right + 1)
        return start, stop

    def to_attribute(self) -> dict:
        """The JSON form stored in `model.key_bands`: {"left": int | null, "right": int | null}."""
        return {"left": self.left, "right": self.right}

    @classmethod
    def from_attribute(cls, value) -> KeyBand:
        if not isinstance(value, dict) or set(value) != {"left", "right"}:
            raise ValueError(f"a stored key band must be {{'left': int | None, 'right': int | None}}, got {value!r}")
        return cls(value["left"], value["right"])


FULL_BAND = KeyBand(None, None)
CAUSAL_BAND = KeyBand(None, 0)


def default_band(causal: bool) -> KeyBand:
    """The band of attention without a window: the prefix for decoders, every key for encoders."""
    return CAUSAL_BAND if causal else FULL_BAND


def band_of_visible(visible: np.ndarray) -> KeyBand:
    """The band of an observed (L, L) visibility matrix ([query, key] True where the mask lets the key through).

    Raises ValueError when the visible keys are not exactly a band around the diagonal (e.g. chunked attention, or a
    query that sees nothing): efficient attention could not be restricted to them."""
    visible = np.asarray(visible, dtype=bool)
    length = visible.shape[0]
    if visible.ndim != 2 or visible.shape[1] != length:
        raise ValueError(f"visible must be a square (query, key) matrix, got shape {visible.shape}")
    if length == 0:
        return FULL_BAND
    if not visible.any(-1).all():
        raise ValueError("some query sees no key at all: the mask is not a band around the diagonal")
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    left = int(np.where(visible, -offset, -length).max())
    right = int(np.where(visible, offset, -length).max())
    band = KeyBand(max(left, 0), max(right, 0)).within(length)
    if not np.array_equal(band.visible(length), visible):
        raise ValueError(
            f"the visible keys are not exactly a band around the diagonal (reach {left} left, {right} right, but "
            "some key inside it is masked or the diagonal is)"
        )
    return band


def store_key_bands(model_attributes: dict, layers: int | Sequence[int]) -> tuple[KeyBand, ...]:
    """Each stored layer's band from a store's `model` attribute, which records one per model layer; `layers`:
    the model indices of the stored layers (a store's selection), or a count for all of them. Stores without
    `key_bands` (written before they were recorded) get `default_band(causal)` for every layer, the rule they were
    computed with."""
    chosen = list(range(layers)) if isinstance(layers, (int, np.integer)) else [int(layer) for layer in layers]
    stored = model_attributes.get("key_bands")
    if stored is None:
        return (default_band(bool(model_attributes.get("causal", False))),) * len(chosen)
    # one band per model layer (a store without a selection: one per stored layer)
    model_layers = (
        int(layers) if isinstance(layers, (int, np.integer)) else int(model_attributes.get("layers", len(stored)))
    )
    if len(stored) != model_layers:
        raise ValueError(
            f"model.key_bands has {len(stored)} entries for {model_layers} layers: the store's "
            "attributes are damaged; extract the store again"
        )
    if chosen and max(chosen) >= len(stored):
        raise ValueError(
            f"model.key_bands has {len(stored)} entries, but the store's selection names layer "
            f"{max(chosen)}: the store's attributes are damaged; extract the store again"
        )
    return tuple(KeyBand.from_attribute(stored[layer]) for layer in chosen)


def outside_band_magnitude(matrices: np.ndarray, length: np.ndarray, bands: Sequence[KeyBand]) -> np.ndarray:
    """[example, layer, head] largest |entry| of the real block on a key its query does not see.

    matrices: [example, layer, head, query, key]; length: [example]; bands: one per layer."""
    examples, layers, heads, positions, _ = matrices.shape
    result = np.zeros((examples, layers, heads))
    if len(bands) != layers:
        raise ValueError(f"{len(bands)} key bands for {layers} layers: pass one band per layer")
    for layer, band in enumerate(bands):
        if band == FULL_BAND:
            continue
        outside = ~band.visible(positions)
        result[:, layer] = np.where(outside, np.abs(matrices[:, layer]), 0).max(axis=(-2, -1))
    return result
