"""Which model layers and heads an attention store holds (issue 15, "capture only what the study needs").

A selection is written by the user as text: "0,3,5", "0-2,5" (ranges are inclusive), or nothing for all. A store
records the model index of each stored layer and head, so that stored index i (the position along the store's
"layer" / "head" dimension) maps back to the model: `selection.layers[i]`, `selection.heads[i]`.

Value is stored per kv head. With grouped-query attention, model head h reads kv head h // (heads // kv_heads); a
store with a head selection keeps only the kv heads its selected heads read (`selection.kv_heads`, model indices,
ascending) and `selection.head_kv` gives, per stored head, the position of its kv head among the stored ones.

A store without a selection attribute (every store written before selections existed) holds every layer and head:
`selection_of_store` returns the full selection for it, so callers need no special case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SELECTION_ATTRIBUTE = "selection"

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class SelectionError(ValueError):
    """A layer or head selection that cannot be used: malformed, empty, out of range, or repeated."""


def parse_index_selection(text: str | None, count: int, what: str) -> tuple[int, ...] | None:
    """Parse "0,3,5" or "0-2,5" into ascending indices in [0, count); None or "" or "all" -> None (everything).

    `what` names the thing selected ("layers", "heads") for the error messages. Raises SelectionError for a
    malformed item, a reversed range, an index >= count, or an index given twice (a likely typo, never silently
    merged).
    """
    if count < 1:
        raise SelectionError(f"cannot select {what}: the model has {count} {what}")
    if text is None or not text.strip() or text.strip().lower() == "all":
        return None
    indices: list[int] = []
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise SelectionError(
                f"--{what} {text!r}: {item.strip()!r} is not an index or a range like 2-4 "
                f"(write e.g. '0,3,5' or '0-2,5', indices 0..{count - 1})"
            )
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise SelectionError(f"--{what} {text!r}: range {item.strip()!r} runs backwards; write {stop}-{start}")
        for index in range(start, stop + 1):
            if index >= count:
                raise SelectionError(
                    f"--{what} {text!r}: index {index} is out of range; the model has {count} {what} (0..{count - 1})"
                )
            if index in indices:
                raise SelectionError(f"--{what} {text!r}: index {index} is given twice; give each once")
            indices.append(index)
    return tuple(sorted(indices))


@dataclass(frozen=True)
class StoreSelection:
    """Model indices of the stored layers and heads of an attention store.

    layers: model layer index of each stored layer, ascending (len = stored layer count)
    heads: model (query) head index of each stored head, ascending (len = stored head count)
    model_layers, model_heads, model_kv_heads: the model's own counts
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    model_layers: int
    model_heads: int
    model_kv_heads: int

    def __post_init__(self) -> None:
        if self.model_heads % self.model_kv_heads:
            raise SelectionError(
                f"model heads ({self.model_heads}) must be a multiple of kv heads ({self.model_kv_heads})"
            )
        for what, chosen, count in (
            ("layers", self.layers, self.model_layers),
            ("heads", self.heads, self.model_heads),
        ):
            if not chosen:
                raise SelectionError(f"a selection needs at least one of the model's {what}")
            if list(chosen) != sorted(set(chosen)) or not all(0 <= index < count for index in chosen):
                raise SelectionError(
                    f"selected {what} {list(chosen)} must be distinct, ascending and in 0..{count - 1}"
                )

    @classmethod
    def everything(cls, layers: int, heads: int, kv_heads: int) -> StoreSelection:
        return cls(tuple(range(layers)), tuple(range(heads)), layers, heads, kv_heads)

    @classmethod
    def parse(
        cls, layers_text: str | None, heads_text: str | None, model_layers: int, model_heads: int, model_kv_heads: int
    ) -> StoreSelection:
        """The selection that --layers / --heads text describes for a model of these counts."""
        layers = parse_index_selection(layers_text, model_layers, "layers")
        heads = parse_index_selection(heads_text, model_heads, "heads")
        return cls(
            layers if layers is not None else tuple(range(model_layers)),
            heads if heads is not None else tuple(range(model_heads)),
            model_layers,
            model_heads,
            model_kv_heads,
        )

    @property
    def is_everything(self) -> bool:
        return len(self.layers) == self.model_layers and len(self.heads) == self.model_heads

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.model_heads // self.model_kv_heads

    @property
    def kv_heads(self) -> tuple[int, ...]:
        """Model indices of the kv heads the stored heads read, ascending: the stored kv heads."""
        return tuple(sorted({head // self.group_size for head in self.heads}))

    @property
    def head_kv(self) -> tuple[int, ...]:
        """Per stored head, the stored position (index into `kv_heads`) of the kv head it reads."""
        position = {kv: i for i, kv in enumerate(self.kv_heads)}
        return tuple(position[head // self.group_size] for head in self.heads)

    def check_storable(self) -> None:
        """Refuse a head selection whose stored kv heads serve unequal numbers of stored heads (grouped-query
        attention only): every stage maps stored head h to stored kv head h // (heads // kv_heads), which equals
        `head_kv` exactly when each stored kv head serves the same number of stored heads."""
        regular = tuple(i // (len(self.heads) // len(self.kv_heads)) for i in range(len(self.heads)))
        if len(self.heads) % len(self.kv_heads) or regular != self.head_kv:
            served = {kv: sum(1 for h in self.heads if h // self.group_size == kv) for kv in self.kv_heads}
            raise SelectionError(
                f"--heads {','.join(map(str, self.heads))}: with grouped-query attention ({self.model_heads} heads "
                f"over {self.model_kv_heads} kv heads, {self.group_size} per kv head) select the same number of "
                f"heads from each kv head used; this selection takes {served} (kv head: heads); e.g. add or drop "
                "heads until the counts are equal"
            )

    def stored_layer(self, model_layer: int) -> int | None:
        """The stored position of a model layer, or None when it is not stored."""
        return self.layers.index(model_layer) if model_layer in self.layers else None

    def to_attribute(self) -> dict:
        """The JSON root attribute a store records (model indices; counts so a reader can check them)."""
        return {
            "layers": list(self.layers),
            "heads": list(self.heads),
            "kv_heads": list(self.kv_heads),
            "model_layers": self.model_layers,
            "model_heads": self.model_heads,
            "model_kv_heads": self.model_kv_heads,
        }

    def describe(self) -> str:
        """One line for inspect and the reports: what 'all layers' means in this store."""

        def span(chosen: tuple[int, ...], count: int, what: str) -> str:
            if len(chosen) == count:
                return f"all {count} {what}"
            return f"{len(chosen)} of {count} {what} ({', '.join(map(str, chosen))})"

        return f"{span(self.layers, self.model_layers, 'layers')}, {span(self.heads, self.model_heads, 'heads')}"


def selection_of_store(attrs: dict, layers: int, heads: int, kv_heads: int) -> StoreSelection:
    """The selection of any store, from its root attributes and its layout's stored counts.

    A store without the attribute holds every layer and head of the model (layers/heads/kv_heads are then the
    model's counts). A recorded selection must agree with the stored counts, or the store is refused.
    """
    recorded = attrs.get(SELECTION_ATTRIBUTE)
    if recorded is None:
        return StoreSelection.everything(layers, heads, kv_heads)
    try:
        selection = StoreSelection(
            tuple(recorded["layers"]),
            tuple(recorded["heads"]),
            int(recorded["model_layers"]),
            int(recorded["model_heads"]),
            int(recorded["model_kv_heads"]),
        )
    except (KeyError, TypeError) as error:
        raise SelectionError(
            f"the store's {SELECTION_ATTRIBUTE!r} attribute {recorded!r} is incomplete ({error}); re-extract the store"
        ) from error
    stored = (len(selection.layers), len(selection.heads), len(selection.kv_heads))
    if stored != (layers, heads, kv_heads):
        raise SelectionError(
            f"the store's selection ({selection.describe()}, {len(selection.kv_heads)} kv heads) "
            f"does not match its arrays' counts (layers, heads, kv_heads) = "
            f"{(layers, heads, kv_heads)}; "
            "the store is damaged: re-extract it"
        )
    return selection


def selection_of_group(group) -> StoreSelection:
    """The selection of an opened attention store (a zarr group with the root attributes `layout` and, for stores
    written since selections exist, `selection`)."""
    attrs = group.attrs.asdict()
    layout = attrs["layout"]
    return selection_of_store(attrs, int(layout["layers"]), int(layout["heads"]), int(layout["kv_heads"]))


def require_everything(group, url: str, stage: str) -> None:
    """Refuse (SelectionError) to run `stage` on a store holding only some layers or heads: used by stages whose
    methods combine every layer of the model (attention rollout, last-layer attention)."""
    selection = selection_of_group(group)
    if not selection.is_everything:
        raise SelectionError(
            f"{url} holds {selection.describe()}; `effattn {stage}` needs every layer and head of the model (its "
            "attributions roll attention through all layers): extract a store without --layers / --heads for it"
        )
