"""What `effattn view` reads from an attention store (and its causal and explanation results), read-only and lazily.

`StoreView` opens the store with `open_attention_store(mode="r")` and never writes. It shows only completed work: the
examples of completed extraction shards, efficient attention of the shards completed for that variant (and still
current), causal outcomes and attributions of completed result shards; a store being written grows as its shards
complete (the completion records are read again on every `refresh`).

Reads are as small as what a page shows:
- a page of the example table reads the per-example columns (length, label, logits, texts, causal outcomes) of that
  page's examples only, unless it is sorted or filtered by a column, which reads that one column over the corpus
  (one number per example); a text search reads texts block by block in the page's order until the page is full;
- an example view reads one (layer, head) block of `attention` and of each `efficient/<variant>` for one example (its
  chunks only), and that example's tokens;
- the overview's layer x head grid is the mean of `diagnostics/<variant>/null_norm_ratio` over the completed shards,
  read in runs of shards and cached until another shard completes.

Nothing here turns a request's values into a path: examples, layers, heads, variants and columns are checked
against the store (`ViewRequestError`, status 404 for an index out of range, 400 for a malformed value).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from analysis.variants import VARIANTS
from storage_schemas.attention_store import (
    AttentionStoreError,
    completed_shards,
    open_attention_store,
    read_texts,
    store_layout,
)
from storage_schemas.causal_results import (
    CausalResultsError,
    causal_completed_shards,
    check_results_of_store,
    open_causal_results,
)
from storage_schemas.efficient_store import diagnostic_array_path, efficient_array_path, efficient_completed_shards
from storage_schemas.explanation_results import explanation_completed_shards, open_explanation_results
from storage_schemas.selection import selection_of_group

# Causal outcomes shown per example: whether the intervention flipped the prediction with every layer replaced.
OUTCOME_KINDS = ("null", "uniform", "ablate")
OUTCOME_METRIC = "flipped"
OUTCOME_TARGET = "all"
SNIPPET_CHARACTERS = 120
SEARCH_BLOCK = 512  # texts read at a time by a text search
GRID_SHARDS_PER_READ = 256  # shards of diagnostics read at once for the overview grid
MAX_PAGE = 200
BASE_COLUMNS = ("index", "length", "label", "prediction", "correct")


class ViewRequestError(ValueError):
    """A request the store cannot answer: `status` 404 (an example, layer, head or variant that does not exist) or
    400 (a malformed value)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TableQuery:
    """One page of the example table. sort: a column (BASE_COLUMNS or an outcome column); label: a class id;
    correct / outcome_value: True, False or None (no filter); outcome: the outcome column `outcome_value` filters."""

    offset: int = 0
    limit: int = 25
    sort: str = "index"
    descending: bool = False
    search: str = ""
    label: int | None = None
    correct: bool | None = None
    outcome: str | None = None
    outcome_value: bool | None = None


@dataclass
class TablePage:
    rows: list[dict[str, Any]]
    total: int | None  # matching examples; None when a text search stopped before the end of the corpus
    more: bool  # whether a next page exists
    columns: list[str]


@dataclass
class ExampleData:
    """One example at one (layer, head): `attention` [L, L] float64 and `efficient` {variant: [L, L]} for the
    variants completed for its shard, L the example's real length; `layer` and `head` are the model's numbers."""

    index: int
    layer: int
    head: int
    tokens: list[str]
    text: str
    label: str
    prediction: str
    attention: np.ndarray
    efficient: dict[str, np.ndarray]
    null_norm_ratio: dict[str, float]
    attributions: dict[str, np.ndarray] = field(default_factory=dict)  # explainer -> [L] (NaN: not removable)


def _runs(shards: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7] -> [(1, 4), (7, 8)]: runs of neighbouring shards as half-open ranges."""
    runs: list[tuple[int, int]] = []
    for shard in sorted(shards):
        if runs and runs[-1][1] == shard:
            runs[-1] = (runs[-1][0], shard + 1)
        else:
            runs.append((shard, shard + 1))
    return runs


def parse_int(text: str | None, name: str, default: int | None = None) -> int | None:
    """A request parameter as an int: a 400 `ViewRequestError` naming it when it is not one."""
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ViewRequestError(400, f"{name} must be an integer, got {text!r}") from None


def parse_bool(text: str | None, name: str) -> bool | None:
    """'yes'/'true'/'1' -> True, 'no'/'false'/'0' -> False, '' or None -> None (no filter); else a 400."""
    if text is None or text in ("", "any"):
        return None
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise ViewRequestError(400, f"{name} must be yes or no, got {text!r}")


class StoreView:
    """A read-only view of the attention store at `url` (path or fsspec URL), with its causal `results` and
    `explanations` when given. `group`: an already opened store (tests pass one wrapped to count reads)."""

    def __init__(
        self,
        url: str,
        results: str | None = None,
        explanations: str | None = None,
        group: zarr.Group | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self.url = url
        self.group = group if group is not None else open_attention_store(url, mode="r")
        self.layout = store_layout(self.group)
        self.selection = selection_of_group(self.group)
        self.tokenizer = tokenizer
        self.results_url, self.explanations_url = results, explanations
        self.results = self.explanations = None
        if results is not None:
            self.results = open_causal_results(results, mode="r")
            check_results_of_store(
                self.results.attrs.asdict(),
                self.attributes,
                results,
                url,
                self.layout.n_examples,
                advice="give the store they came from",
            )
        if explanations is not None:
            self.explanations = open_explanation_results(explanations, mode="r")
            check_results_of_store(
                self.explanations.attrs.asdict(),
                self.attributes,
                explanations,
                url,
                self.layout.n_examples,
                advice="give the store they came from",
                check_selection=False,
            )
        self._columns: dict[tuple, np.ndarray] = {}
        self._grid: dict[str, tuple[tuple[int, ...], np.ndarray, int]] = {}
        self._outcomes = self._outcome_columns()
        self._explained: dict[int, int] | None = None
        self.refresh()

    # --- what is complete --------------------------------------------------------------------------------------
    @property
    def attributes(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    def refresh(self) -> None:
        """Read the completion records again (a store being written shows each shard once it completes)."""
        self.group = zarr.open_group(self.group.store_path, mode="r")
        if self.results is not None:
            self.results = zarr.open_group(self.results.store_path, mode="r")
        if self.explanations is not None:
            self.explanations = zarr.open_group(self.explanations.store_path, mode="r")
        self.shards = completed_shards(self.group)
        self.variant_shards = {
            variant: set(efficient_completed_shards(self.group, variant))
            for variant in VARIANTS
            if efficient_array_path(variant) in self.group
        }
        self.result_shards = (
            set(causal_completed_shards(self.results, self.group)) if self.results is not None else set()
        )
        self.explanation_shards = (
            set(explanation_completed_shards(self.explanations, self.group)) if self.explanations is not None else set()
        )

    @property
    def variants(self) -> list[str]:
        """The variants with at least one completed shard, in VARIANTS order."""
        return [variant for variant, shards in self.variant_shards.items() if shards]

    def visible_examples(self) -> np.ndarray:
        """Store indices of the examples of completed extraction shards, in store order [examples shown]."""
        pieces = [
            np.arange(start * self.layout.shard_size, min(stop * self.layout.shard_size, self.layout.n_examples))
            for start, stop in _runs(self.shards)
        ]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def shard_of(self, index: int) -> int:
        return index // self.layout.shard_size

    def check_example(self, index: int) -> None:
        if not 0 <= index < self.layout.n_examples:
            raise ViewRequestError(
                404, f"example {index} does not exist: the store has examples 0..{self.layout.n_examples - 1}"
            )
        if self.shard_of(index) not in self.shards:
            raise ViewRequestError(
                404, f"example {index} is not extracted yet (its shard {self.shard_of(index)} is not complete)"
            )

    def layer_position(self, layer: int) -> int:
        """The stored position of the model's layer `layer` (404 when it is not stored)."""
        if layer not in self.selection.layers:
            raise ViewRequestError(
                404, f"layer {layer} is not in the store: it holds layers {list(self.selection.layers)}"
            )
        return list(self.selection.layers).index(layer)

    def head_position(self, head: int) -> int:
        if head not in self.selection.heads:
            raise ViewRequestError(404, f"head {head} is not in the store: it holds heads {list(self.selection.heads)}")
        return list(self.selection.heads).index(head)

    # --- overview ----------------------------------------------------------------------------------------------
    def null_norm_grid(self, variant: str) -> tuple[np.ndarray, int]:
        """(mean of ||A - E||_F / ||A||_F over the completed examples of `variant` [layer, head], examples in the
        mean); read shard run by shard run and cached until another shard of `variant` completes."""
        shards = tuple(sorted(self.variant_shards.get(variant, ())))
        cached = self._grid.get(variant)
        if cached is None or cached[0] != shards:
            array = self.group[diagnostic_array_path(variant, "null_norm_ratio")]
            total = np.zeros((self.layout.layers, self.layout.heads), dtype=np.float64)
            count = 0
            size = self.layout.shard_size
            for start, stop in _runs(list(shards)):
                for first in range(start, stop, GRID_SHARDS_PER_READ):
                    last = min(stop, first + GRID_SHARDS_PER_READ)
                    block = np.asarray(array[first * size : min(last * size, self.layout.n_examples)])
                    total += block.sum(axis=0)
                    count += block.shape[0]
            cached = self._grid[variant] = (shards, total / count if count else np.full_like(total, np.nan), count)
        return cached[1], cached[2]

    def class_names(self) -> list[str]:
        return list((self.attributes.get("corpus") or {}).get("class_names") or [])

    def label_name(self, label: int) -> str:
        names = self.class_names()
        if label < 0:
            return "none"
        return names[label] if label < len(names) else str(label)

    def claims(self) -> list[dict[str, Any]]:
        return list(self.results.attrs.get("claims") or []) if self.results is not None else []

    # --- per-example columns -----------------------------------------------------------------------------------
    def _outcome_columns(self) -> dict[str, tuple[int, int]]:
        """Outcome column name ('flipped by null:simplex') -> (intervention, target) position in the results."""
        if self.results is None or OUTCOME_METRIC not in self.results:
            return {}
        interventions = [str(item) for item in self.results["intervention"][...].tolist()]
        kinds = [str(item) for item in self.results["intervention_kind"][...].tolist()]
        targets = [str(item) for item in self.results["target"][...].tolist()]
        if OUTCOME_TARGET not in targets:
            return {}
        target = targets.index(OUTCOME_TARGET)
        return {
            f"flipped by {name}": (position, target)
            for position, (name, kind) in enumerate(zip(interventions, kinds))
            if kind in OUTCOME_KINDS
        }

    @property
    def columns(self) -> list[str]:
        return [*BASE_COLUMNS, *self._outcomes]

    def _read(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Column `name` at the store examples `indices` (sorted, unique) [len(indices)], float64 with NaN for an
        unknown value (no label, not measured, next-token prediction)."""
        if name == "index":
            return indices.astype(np.float64)
        if name in ("length", "label"):
            return np.asarray(self.group[name].get_orthogonal_selection(indices), dtype=np.float64)
        if name == "prediction":
            if self.layout.task != "classification":
                return np.full(len(indices), np.nan)
            logits = np.asarray(self.group["logits"].get_orthogonal_selection((indices, slice(None))))
            return np.argmax(logits, axis=1).astype(np.float64) if len(indices) else np.zeros(0)
        if name == "correct":
            prediction, label = self._read("prediction", indices), self._read("label", indices)
            return np.where(np.isnan(prediction) | (label < 0), np.nan, (prediction == label).astype(np.float64))
        if name in self._outcomes:
            intervention, target = self._outcomes[name]
            values = np.asarray(
                self.results[OUTCOME_METRIC].get_orthogonal_selection(([intervention], [target], indices))[0, 0],
                dtype=np.float64,
            )
            measured = np.array([self.shard_of(int(index)) in self.result_shards for index in indices], dtype=bool)
            return np.where(measured, values, np.nan)
        raise ViewRequestError(400, f"unknown column {name!r}: choose from {self.columns}")

    def column(self, name: str, indices: np.ndarray) -> np.ndarray:
        """`_read` at any `indices` (any order, repeats allowed) [len(indices)]."""
        if not len(indices):
            return np.zeros(0)
        unique, inverse = np.unique(indices, return_inverse=True)
        return self._read(name, unique)[inverse]

    def whole_column(self, name: str, visible: np.ndarray) -> np.ndarray:
        """Column `name` over every visible example (one number each), cached until more shards complete."""
        key = (name, tuple(self.shards), tuple(sorted(self.result_shards)))
        if key not in self._columns:
            self._columns = {k: v for k, v in self._columns.items() if k[0] != name}
            self._columns[key] = self.column(name, visible)
        return self._columns[key]

    # --- the example table ---------------------------------------------------------------------------------------
    def check_query(self, query: TableQuery) -> None:
        if query.offset < 0:
            raise ViewRequestError(400, f"offset must be 0 or more, got {query.offset}")
        if not 1 <= query.limit <= MAX_PAGE:
            raise ViewRequestError(400, f"limit must be 1..{MAX_PAGE}, got {query.limit}")
        if query.sort not in self.columns:
            raise ViewRequestError(400, f"cannot sort by {query.sort!r}: choose from {self.columns}")
        if query.outcome is not None and query.outcome not in self._outcomes:
            raise ViewRequestError(400, f"unknown outcome {query.outcome!r}: choose from {list(self._outcomes)}")

    def table(self, query: TableQuery) -> TablePage:
        """One page of the example table: rows of index, text snippet, length, label, prediction, correct and the
        outcome columns, for the examples matching the filters, in the sort order."""
        self.check_query(query)
        visible = self.visible_examples()
        positions = np.arange(len(visible))  # into `visible`
        filters = [("label", query.label), ("correct", query.correct), (query.outcome, query.outcome_value)]
        for name, wanted in filters:
            if name is not None and wanted is not None:
                positions = positions[self.whole_column(name, visible)[positions] == float(wanted)]
        if query.sort != "index" or query.descending:
            values = self.whole_column(query.sort, visible)[positions]
            values = np.where(np.isnan(values), -np.inf if query.descending else np.inf, values)  # unknown: last
            positions = positions[np.lexsort((positions, -values if query.descending else values))]  # ties: store order
        order = visible[positions]
        if query.search:
            page, more = self._search(order, query.search.lower(), query.offset, query.limit)
            total = None if more else query.offset + len(page)
        else:
            page = order[query.offset : query.offset + query.limit]
            total, more = len(order), query.offset + query.limit < len(order)
        return TablePage(rows=self._rows(page), total=total, more=more, columns=self.columns)

    def _search(self, order: np.ndarray, needle: str, offset: int, limit: int) -> tuple[np.ndarray, bool]:
        """The `limit` matches after the first `offset` of `needle` in the texts, in `order`; reads texts block by
        block and stops once one match past the page is found (whether there is more)."""
        found: list[int] = []
        for start in range(0, len(order), SEARCH_BLOCK):
            block = order[start : start + SEARCH_BLOCK]
            texts = read_texts(self.group, np.sort(block))
            by_index = dict(zip(np.sort(block).tolist(), texts))
            found += [int(index) for index in block if needle in by_index[int(index)].lower()]
            if len(found) > offset + limit:
                break
        return np.asarray(found[offset : offset + limit], dtype=np.int64), len(found) > offset + limit

    def _rows(self, page: np.ndarray) -> list[dict[str, Any]]:
        if not len(page):
            return []
        values = {name: self.column(name, page) for name in self.columns}
        sorted_page = np.sort(page)
        texts = dict(zip(sorted_page.tolist(), read_texts(self.group, sorted_page)))
        rows = []
        for position, index in enumerate(page.tolist()):
            text = texts[index]
            row: dict[str, Any] = {
                "index": index,
                "text": text[:SNIPPET_CHARACTERS] + ("…" if len(text) > SNIPPET_CHARACTERS else ""),
            }
            for name in self.columns[1:]:
                value = values[name][position]
                row[name] = (
                    None
                    if np.isnan(value)
                    else (int(value) if name in ("length", "label", "prediction") else bool(value))
                )
            row["label"] = None if row["label"] is None else self.label_name(row["label"])
            row["prediction"] = None if row["prediction"] is None else self.label_name(row["prediction"])
            rows.append(row)
        return rows

    # --- one example -----------------------------------------------------------------------------------------------
    def token_labels(self, index: int) -> list[str]:
        n = int(self.group["length"][index])
        ids = [int(token) for token in np.asarray(self.group["tokens"][index, :n])]
        if self.tokenizer is None:
            return [str(token) for token in ids]
        try:
            return [str(token) for token in self.tokenizer.convert_ids_to_tokens(ids)]
        except Exception:  # noqa: BLE001 - a tokenizer that does not know these ids: the ids
            return [str(token) for token in ids]

    def example(self, index: int, layer: int, head: int) -> ExampleData:
        """Example `index` at the model's `layer` and `head`: only its chunks are read (404 for an example, layer or
        head that is not in the store or not extracted yet)."""
        self.check_example(index)
        layer_at, head_at = self.layer_position(layer), self.head_position(head)
        n = int(self.group["length"][index])
        shard = self.shard_of(index)
        variants = [variant for variant in self.variants if shard in self.variant_shards[variant]]
        paths = ["attention", *(efficient_array_path(variant) for variant in variants)]
        blocks = self._blocks_of(paths, index, layer_at, head_at, n)
        efficient = dict(zip(variants, blocks[1:]))
        ratios = {
            variant: float(self.group[diagnostic_array_path(variant, "null_norm_ratio")][index, layer_at, head_at])
            for variant in variants
        }
        label = int(self.group["label"][index])
        prediction = self.column("prediction", np.array([index]))[0]
        return ExampleData(
            index=index,
            layer=layer,
            head=head,
            tokens=self.token_labels(index),
            text=read_texts(self.group, [index])[0],
            label=self.label_name(label),
            prediction="—" if np.isnan(prediction) else self.label_name(int(prediction)),
            attention=blocks[0],
            efficient=efficient,
            null_norm_ratio=ratios,
            attributions=self.attributions(index, n),
        )

    def _blocks_of(self, paths: list[str], index: int, layer_at: int, head_at: int, n: int) -> list[np.ndarray]:
        """Each array of `paths` at example `index`, stored layer `layer_at` and head `head_at`: [n, n] float64.
        The arrays are read in parallel threads (each read decodes one chunk; measured faster than keeping whole
        decoded chunks, which costs a copy of every layer and head: benchmarks/view_latency.py)."""

        def read(path: str) -> np.ndarray:
            return np.asarray(self.group[path][index, layer_at, head_at, :n, :n], dtype=np.float64)

        with ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(read, paths))

    def attributions(self, index: int, n: int) -> dict[str, np.ndarray]:
        """explainer -> token attribution [n] of example `index` (empty when it was not explained, or its results
        shard is not complete)."""
        if self.explanations is None:
            return {}
        if self._explained is None:
            self._explained = {
                int(example): position
                for position, example in enumerate(np.asarray(self.explanations["store_example"][...]).tolist())
            }
        position = self._explained.get(index)
        shard_size = int(self.explanations.attrs["shard_size"])
        if position is None or position // shard_size not in self.explanation_shards:
            return {}
        names = [str(name) for name in self.explanations["explainer"][...].tolist()]
        values = np.asarray(self.explanations["attribution"][:, position, :n], dtype=np.float64)
        return dict(zip(names, values))


def open_store_view(
    url: str, results: str | None = None, explanations: str | None = None, tokenizer: Any | None = None
) -> StoreView:
    """`StoreView(url, results, explanations)`: an `AttentionStoreError` (a `CausalResultsError` for results of
    another store) says what is wrong and what to do."""
    return StoreView(url, results, explanations, tokenizer=tokenizer)


__all__ = [
    "AttentionStoreError",
    "CausalResultsError",
    "ExampleData",
    "StoreView",
    "TablePage",
    "TableQuery",
    "ViewRequestError",
    "open_store_view",
    "parse_bool",
    "parse_int",
]
