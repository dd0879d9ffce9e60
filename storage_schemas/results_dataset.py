"""A results dataset, declared once by a schema record and implemented once here.

A results dataset (the causal results, the explanation results) is a Zarr v3 group computed from an attention
store that opens as one xarray Dataset (`xarray.open_zarr(url, consolidated=False)`). Its `ResultsSchema` declares
what differs between datasets: its name and version, the command that writes it, its arrays (dims, dtype, fill and
description) and how its shards depend on the store's shards. Everything else is the same for every dataset and
lives here: create, open and validate (a dataset of another schema version is refused, saying what to do), the
settings check, durable whole-shard writes (storage_schemas.durable_writes), completion records with the
identities of the store shards each shard read (storage_schemas.shard_records), stale shards, aggregates and the
pipeline's status check. So is what ties a dataset to its store (`results_store_identity`,
`check_results_of_store`).

Arrays:

* coordinates: 1-D, written at creation, one chunk each (their dim is the array's own, or `example`);
* per-example arrays: written shard by shard; chunked by the results' shards along `example` (`shard_size`
  examples), every other dim whole in one chunk. A dataset may also name per-example arrays when it is created
  (the causal results' metrics, recorded in the attribute `metrics`): they share one declared `metric_array`;
* aggregates: float64, written once every shard is done, one chunk.

Root attributes: the caller's (provenance, `settings`), then `schema`, `schema_version`, `shard_size`, `metrics`
(when the dataset has metric arrays) and the shard records (`completed_shards`, `shard_identities`,
`shard_inputs`); after aggregation the caller's `claims` and whatever else it writes. Results of a store that grows
(`store_grows`) also record `store_examples`: the store's example count they were made (or last grown) for.

Growth: when such a store has grown, the stage that writes the results calls `grow` under the results' lock: the
example coordinates get the new examples' values, every per-example array is resized along `example` (new rows read
as the fill), the old last shard, when it was partial, is forgotten (it gains examples) and so are the claims; every
other completed shard stays done while its recorded inputs are current (the store shard that extraction wrote again
makes the shards that read it stale by the usual rule). Examples are only appended: a result row never moves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zarr

from storage_schemas.attention_store import _compressors, open_attention_store, store_layout
from storage_schemas.durable_writes import write_whole_shard
from storage_schemas.efficient_store import efficient_array_path
from storage_schemas.errors import AttentionStoreError, IncompleteInputError, ResultsDatasetError
from storage_schemas.selection import selection_of_store
from storage_schemas.shard_records import InputsNow, completion_update, current_and_stale_shards, removal_update
from storage_schemas.stage_checks import StageCheck

NAN = float("nan")


@dataclass(frozen=True)
class ResultArray:
    """One array of a results dataset: its dims, storage dtype (a numpy dtype name, or "string" for
    variable-length UTF-8), what it means and the value of what was never written."""

    dims: tuple[str, ...]
    dtype: str
    description: str
    fill: Any = 0


def text_coordinate(dim: str, description: str) -> ResultArray:
    """A coordinate of strings along `dim` ("" where unwritten)."""
    return ResultArray((dim,), "string", description, fill="")


# (results group, attention store group) -> for each recorded shard of the results, what it reads now
# (storage_schemas.shard_records.InputsNow).
CurrentInputs = Callable[[zarr.Group, zarr.Group], Callable[[int], InputsNow]]


@dataclass(frozen=True, eq=False)
class ResultsSchema:
    """The declaration of a results dataset; its methods are the dataset's functions."""

    kind: str  # "causal": messages say "causal results", "causal shard 3"
    name: str  # the root attribute `schema`
    version: int  # the root attribute `schema_version`; other versions are refused
    command: str  # the command that writes it, e.g. "effattn causal"
    version_advice: str  # what the refusal of another version says, after "reads version N"
    error: type[ResultsDatasetError]
    coordinates: Mapping[str, ResultArray]  # the first one is created first: its presence marks a started creation
    per_example: Mapping[str, ResultArray]
    aggregates: Mapping[str, ResultArray]
    required: tuple[str, ...]  # arrays (beside the metric arrays) without which a dataset was not completely created
    current_inputs: CurrentInputs
    metric_array: ResultArray | None = None  # the arrays named by `metrics` at creation (None: the dataset has none)

    @property
    def noun(self) -> str:
        return f"{self.kind} results"

    # -- create and open -----------------------------------------------------------------------------------------

    def per_example_arrays(self, metrics: Sequence[str] = ()) -> dict[str, ResultArray]:
        """Every array written shard by shard: the metric arrays `metrics`, then the declared ones."""
        named = {name: self.metric_array for name in metrics} if self.metric_array is not None else {}
        return {**named, **self.per_example}

    def create(
        self,
        url: str,
        coordinates: Mapping[str, Any],
        shard_size: int,
        attributes: dict[str, Any],
        sizes: Mapping[str, int] | None = None,
        metrics: Mapping[str, str] | None = None,
        storage_options: dict | None = None,
    ) -> zarr.Group:
        """Create an empty dataset at `url` (an error if anything exists there): every coordinate with its values
        (`coordinates`: name -> values), the per-example arrays (`metrics`: metric name -> description, for a
        dataset with metric arrays) and the root attributes. `sizes` gives the dims that have no coordinate."""
        missing = sorted(set(self.coordinates) - set(coordinates))
        if missing:
            raise ValueError(f"{self.noun}: the coordinates {missing} are missing")
        if metrics and self.metric_array is None:
            raise ValueError(f"{self.noun} have no metric arrays, but metrics {list(metrics)} were given")
        try:
            group = zarr.open_group(url, mode="w-", zarr_format=3, storage_options=storage_options)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise self.error(
                f"something already exists at {url}: choose a new --results path, or delete it to start over"
            ) from None
        all_sizes = {
            **(sizes or {}),
            **{spec.dims[0]: len(coordinates[name]) for name, spec in self.coordinates.items()},
        }
        for name, spec in self.coordinates.items():
            values = np.asarray(coordinates[name], dtype=object if spec.dtype == "string" else spec.dtype)
            array = _create_array(group, name, spec, values.shape, values.shape)
            array[...] = values
        metric_arrays = {
            name: replace(self.metric_array, description=description) for name, description in (metrics or {}).items()
        }
        for name, spec in {**metric_arrays, **self.per_example}.items():
            shape = tuple(all_sizes[dim] for dim in spec.dims)
            chunks = tuple(shard_size if dim == "example" else n for dim, n in zip(spec.dims, shape))
            _create_array(group, name, spec, shape, chunks)
        group.attrs.update(
            {
                **attributes,
                "schema": self.name,
                "schema_version": self.version,
                "shard_size": int(shard_size),
                **({"metrics": list(metrics or {})} if self.metric_array is not None else {}),
                "completed_shards": [],
            }
        )
        return group

    def open(self, url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
        """Open a dataset; `self.error` says what is wrong and what to do."""
        try:
            group = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)
        except FileNotFoundError:
            raise self.error(
                f"there are no {self.noun} at {url}: create them with `{self.command} --store STORE --results {url}`"
            ) from None
        attributes = group.attrs.asdict()
        if "schema" not in attributes and next(iter(self.coordinates)) in group:
            raise self.error(
                f"{url} was never completely created (its creation stopped before the attributes were written): "
                f"delete it and run `{self.command}` again"
            )
        if attributes.get("schema") != self.name:
            raise self.error(
                f"{url} is not an effattn {self.noun} dataset (its 'schema' attribute is {attributes.get('schema')!r}"
                f", expected {self.name!r}): point --results at a dataset written by `{self.command}`"
            )
        if attributes.get("schema_version") != self.version:
            raise self.error(
                f"{url} has {self.noun} schema version {attributes.get('schema_version')!r}, but this effattn reads "
                f"version {self.version}{self.version_advice}"
            )
        missing = [name for name in (*attributes.get("metrics", []), *self.required) if name not in group]
        if missing:
            raise self.error(
                f"{url} lacks the arrays {missing}: it was not completely created; delete it and run "
                f"`{self.command}` again"
            )
        return group

    def load(self, url: str, storage_options: dict | None = None):
        """The whole dataset as an in-memory xarray Dataset (small: per-example numbers), after validation."""
        import xarray as xr

        self.open(url, storage_options=storage_options)
        return xr.open_zarr(url, consolidated=False, storage_options=storage_options).load()

    def check_same_settings(self, group: zarr.Group, url: str, settings: dict[str, Any]) -> None:
        """Refuse to resume a dataset made with other settings, naming every difference."""
        stored = group.attrs.get("settings", {})
        differences = [
            f"{key}: stored {stored.get(key)!r}, requested {settings.get(key)!r}"
            for key in sorted(set(stored) | set(settings))
            if stored.get(key) != settings.get(key)
        ]
        if differences:
            raise self.error(
                f"{url} holds {self.noun} of another run ({'; '.join(differences)}): use the same settings to "
                "resume it, or choose a new --results path"
            )

    # -- growth --------------------------------------------------------------------------------------------------

    def n_examples(self, group: zarr.Group) -> int:
        """The examples the results hold (the length of their `example` dim)."""
        return int(group["example"].shape[0])

    def grow(self, group: zarr.Group, new_coordinates: Mapping[str, Any], store_examples: int) -> list[int]:
        """Append examples to the results: `new_coordinates` gives, for every coordinate along `example`, the new
        examples' values [new examples]; every per-example array is resized along `example` (the new rows read as its
        fill). The old last shard, when partial, is forgotten (it gains examples; returned), and so are the claims.
        `store_examples` (the store's example count now) is recorded. Only from the driver that holds the results'
        lock. With no new examples only `store_examples` changes."""
        along = [name for name, spec in self.coordinates.items() if spec.dims == ("example",)]
        missing = sorted(set(along) - set(new_coordinates))
        if missing:
            raise ValueError(f"{self.noun}: growing them needs the new values of the coordinates {missing}")
        added = {len(new_coordinates[name]) for name in along}
        if len(added) != 1:
            raise ValueError(f"{self.noun}: the new coordinate values have different lengths {sorted(added)}")
        added_count = added.pop()
        old = self.n_examples(group)
        size = int(group.attrs["shard_size"])
        forgotten: list[int] = []
        if added_count:
            new = old + added_count
            for name in along:  # coordinates first: the dataset's size is the `example` coordinate's
                spec = self.coordinates[name]
                values = np.asarray(new_coordinates[name], dtype=object if spec.dtype == "string" else spec.dtype)
                group[name].resize((new,))
                group[name][old:new] = values
            for name, spec in self.per_example_arrays(group.attrs.get("metrics", [])).items():
                array = group[name]
                axis = spec.dims.index("example")
                array.resize(tuple(new if i == axis else n for i, n in enumerate(array.shape)))
            if old % size:
                forgotten = [old // size]
            forget_shards(group, forgotten)
            if "claims" in group.attrs:
                del group.attrs["claims"]
        group.attrs["store_examples"] = int(store_examples)
        return forgotten

    # -- shards --------------------------------------------------------------------------------------------------

    def shard_count(self, group: zarr.Group) -> int:
        return -(-group["example"].shape[0] // int(group.attrs["shard_size"]))

    def shard_region(self, group: zarr.Group, shard_index: int) -> slice:
        """The examples of one shard; an IndexError for a shard that does not exist."""
        examples = group["example"].shape[0]
        size = int(group.attrs["shard_size"])
        n_shards = -(-examples // size)
        if not 0 <= shard_index < n_shards:
            raise IndexError(f"shard {shard_index} does not exist: the results have shards 0..{n_shards - 1}")
        return slice(shard_index * size, min((shard_index + 1) * size, examples))

    def shard_states(self, group: zarr.Group, store_group: zarr.Group) -> tuple[list[int], list[int]]:
        """(current, stale) recorded shards: stale ones were computed from store shards that are not complete now,
        or were written again since (or lie beyond the dataset's shards)."""
        n_shards = self.shard_count(group)
        inputs_now = self.current_inputs(group, store_group)
        return current_and_stale_shards(
            group.attrs.asdict(), lambda shard: inputs_now(shard) if 0 <= shard < n_shards else None
        )

    def completed_shards(self, group: zarr.Group, store_group: zarr.Group) -> list[int]:
        """The shards of the results `group` that are computed and still current: computed from the shards of the
        attention store `store_group` as they are now."""
        return self.shard_states(group, store_group)[0]

    def forget_stale_shards(self, group: zarr.Group, store_group: zarr.Group) -> list[int]:
        """Record the stale shards as not done (and drop the claims, which they entered); returns them. Only from
        the driver that holds the results' lock."""
        stale = self.shard_states(group, store_group)[1]
        forget_shards(group, stale)
        return stale

    def mark_shard_completed(self, group: zarr.Group, shard_index: int, inputs: dict[str, str]) -> None:
        """Record a shard as done, computed from the store's shards of these identities (input name -> identity,
        taken before the shard's inputs were read); only after its data is written, only from the driver."""
        self.shard_region(group, shard_index)  # an IndexError for a shard that does not exist
        if not inputs or any(identity is None for identity in inputs.values()):
            raise IncompleteInputError(
                f"{self.kind} shard {shard_index} cannot be recorded as done: its inputs {inputs} were not all complete"
            )
        group.attrs.update(completion_update(group.attrs.asdict(), shard_index, inputs))

    def write_shard(self, group: zarr.Group, shard_index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write one whole shard, durably: every per-example array, shaped as stored with `example` cut to the
        shard's examples. A full disk or a store this process may not write raises `StoreFullError` /
        `StoreNotWritableError`."""
        region = self.shard_region(group, shard_index)
        specs = self.per_example_arrays(group.attrs.get("metrics", []))
        missing = sorted(set(specs) - set(arrays))
        if missing:
            raise ValueError(f"shard {shard_index}: arrays {missing} are missing")
        writes = []
        for name, spec in specs.items():  # check every shape before writing anything
            axis = spec.dims.index("example")
            expected = tuple(region.stop - region.start if i == axis else n for i, n in enumerate(group[name].shape))
            values = np.asarray(arrays[name])
            if values.shape != expected:
                raise ValueError(f"shard {shard_index}: {name} has shape {values.shape}, expected {expected}")
            index = tuple(region if i == axis else slice(None) for i in range(len(spec.dims)))
            writes.append((name, index, values.astype(spec.dtype)))
        write_whole_shard(
            group, shard_index, writes, recorded_done=shard_index in group.attrs.get("completed_shards", [])
        )

    # -- once every shard is done ----------------------------------------------------------------------------------

    def write_aggregates(self, group: zarr.Group, aggregates: Mapping[str, np.ndarray]) -> None:
        """Write (or overwrite) every declared aggregate, shaped by its dims' coordinates."""
        for name, spec in self.aggregates.items():
            values = np.asarray(aggregates[name], dtype=spec.dtype)
            shape = tuple(group[dim].shape[0] for dim in spec.dims)
            if values.shape != shape:
                raise ValueError(f"aggregate {name} has shape {values.shape}, expected {shape}")
            if name in group:
                group[name][...] = values
            else:
                _create_array(group, name, spec, shape, shape)[...] = values

    def status(self, url: str, settings: dict[str, Any], store: str) -> StageCheck:
        """The pipeline's check: complete when the results at `url` were made with `settings`, every shard is done
        and still current for the attention store at `store` (computed from its shards as they are now), and the
        claims are written; conflicting when made with other settings."""
        try:
            group = self.open(url, mode="r")
        except ResultsDatasetError as error:
            return StageCheck(False, str(error))
        attributes = group.attrs.asdict()
        if attributes.get("settings") != json.loads(json.dumps(settings)):  # as the JSON attribute reads back
            return StageCheck(False, f"{url} holds {self.noun} of other settings", conflicting=True)
        try:
            store_group = open_attention_store(store, mode="r")
            done = len(self.completed_shards(group, store_group))
            store_examples = store_layout(store_group).n_examples
        except AttentionStoreError as error:
            return StageCheck(False, str(error))
        if store_examples > attributes.get("store_examples", store_examples):
            return StageCheck(False, f"the store {store} has grown since {url} was computed: its new examples are due")
        shards = self.shard_count(group)
        if done < shards or "claims" not in attributes:
            return StageCheck(False, f"{done} of {shards} shards of {url} are done")
        return StageCheck(True, f"{url} is complete ({shards} shards, claims written)")


def _create_array(group: zarr.Group, name: str, spec: ResultArray, shape, chunks) -> zarr.Array:
    """An array of `spec`, every chunk dim at least 1 (an empty dim still has a chunk)."""
    return group.create_array(
        name,
        shape=tuple(shape),
        dtype=str if spec.dtype == "string" else spec.dtype,
        chunks=tuple(max(int(n), 1) for n in chunks),
        compressors=_compressors(),
        fill_value=spec.fill,
        dimension_names=spec.dims,
        attributes={"description": spec.description},
    )


def forget_shards(group: zarr.Group, shards: list[int]) -> None:
    """Record `shards` of a results dataset as not done, and drop its claims, which they entered. Only from the
    driver that holds the results' lock."""
    if shards:
        group.attrs.update(removal_update(group.attrs.asdict(), shards))
        if "claims" in group.attrs:
            del group.attrs["claims"]


# ----------------------------------------------------------------------------------------------------------------
# What ties results to the attention store they were computed from: the results record it in
# `settings.store_identity` (a rerun compares the whole settings, so changed weights, corpus or efficient settings
# make them another run), and whoever reads results beside a store checks it (`check_results_of_store`).


GROWING_SELECTION = "keyed-hash"  # tasks.extraction.KEYED_SELECTION: the corpus selection of a store that grows


def store_grows(store_attributes: dict[str, Any]) -> bool:
    """Whether the store of these attributes appends what its corpus adds (it chose its rows by the keyed split and
    records the runs that added its examples, schema v3): its corpus digest and example count change as it grows."""
    selection = store_attributes.get("corpus", {}).get("selection", {})
    return selection.get("method") == GROWING_SELECTION and bool(store_attributes.get("runs"))


def _store_facts(store_attributes: dict[str, Any], n_examples: int) -> dict[str, Any]:
    """The store's identity that a reader can check from its attributes alone. A store that grows is one series
    (model weights, dtype and the run that created it, `first_run`): growth keeps its results valid; any other store
    is its corpus and example count too."""
    if store_grows(store_attributes):
        return {
            "weights_digest": store_attributes.get("model", {}).get("weights_digest"),
            "first_run": store_attributes["runs"][0].get("run_id"),
            "dtype": store_attributes.get("layout", {}).get("dtype"),
        }
    return {
        "weights_digest": store_attributes.get("model", {}).get("weights_digest"),
        "corpus_digest": store_attributes.get("corpus", {}).get("digest"),
        "examples": n_examples,
        "dtype": store_attributes.get("layout", {}).get("dtype"),
    }


def _stored_selection(store_attributes: dict[str, Any]) -> dict[str, Any] | None:
    """The store's selection of layers and heads as an attribute; None for a store of every layer and head."""
    layout = store_attributes.get("layout", {})
    selection = selection_of_store(
        store_attributes, layout.get("layers", 0), layout.get("heads", 0), layout.get("kv_heads", 1)
    )
    return None if selection.is_everything else selection.to_attribute()


def results_store_identity(store_group: zarr.Group, variants: Sequence[str], with_dtype: bool = True) -> dict[str, Any]:
    """The `store_identity` results of the store `store_group` record: model weights, corpus and example count (a
    store that grows: its first run instead, `_store_facts`), storage dtype (left out `with_dtype=False`: the
    explanation results have never recorded it, and a rerun must record what they did to resume them), the selection
    of layers and heads (a store of everything records none) and the settings of the efficient attention of
    `variants` that the store holds."""
    attributes = store_group.attrs.asdict()
    facts = _store_facts(attributes, store_layout(store_group).n_examples)
    if not with_dtype:
        del facts["dtype"]
    selection = _stored_selection(attributes)
    return {
        **facts,
        **({} if selection is None else {"selection": selection}),
        "efficient_settings": {
            variant: store_group[efficient_array_path(variant)].attrs.get("settings")
            for variant in variants
            if efficient_array_path(variant) in store_group
        },
    }


def check_results_of_store(
    results_attributes: dict[str, Any],
    store_attributes: dict[str, Any],
    results: str,
    store: str,
    n_examples: int,
    advice: str = "pass the store they came from with --store",
    check_selection: bool = True,
    error: type[ResultsDatasetError] = ResultsDatasetError,
) -> None:
    """Refuse (`error`) results whose recorded `settings.store_identity` (model weights, corpus and example count
    or, for a store that grows, its first run, storage dtype where recorded and, with `check_selection`, the stored
    layers and heads) differs from the attention store's; every difference is named, then `advice`."""
    identity = results_attributes.get("settings", {}).get("store_identity", {})
    found = _store_facts(store_attributes, n_examples)
    differences = [
        f"{key}: results {identity[key]!r}, store {found[key]!r}"
        for key in found
        if key in identity and identity[key] != found[key]
    ]
    if check_selection:
        stored = _stored_selection(store_attributes)
        if identity.get("selection") != stored:
            differences.append(f"selection: results {identity.get('selection')!r}, store {stored!r}")
    if differences:
        raise error(
            f"{results} were not computed from the attention store {store} ({'; '.join(differences)}): {advice}"
        )
