"""Can another Zarr v3 implementation read this? A check of every node's `zarr.json` against the specifications.

A store is portable when every array and group is Zarr format 3 and every array uses only:

* a data type of the Zarr v3 core specification, or one registered in zarr-extensions with a written
  specification (`REGISTERED_DATA_TYPES`: only `string`, variable-length UTF-8, here);
* codecs of the core specification or registered in zarr-extensions (`bytes`, `transpose`, `gzip`, `blosc`,
  `sharding_indexed`, `crc32c`, `zstd`; and `vlen-utf8`, the codec of `string`), nested codecs of a
  `sharding_indexed` codec included;
* the `regular` chunk grid, the `default` or `v2` chunk key encoding, no storage transformers;
* `dimension_names`, naming every dimension (xarray and other labelled readers need them).

zarr-python 3.1.6 writes some data types that have no Zarr v3 specification and warns about them with
`zarr.errors.UnstableSpecificationWarning`: `fixed_length_utf32` (numpy `<U` strings: what xarray writes for a
numpy unicode array), `null_terminated_bytes` (numpy `S`), `raw_bytes` (numpy `V`), `variable_length_bytes` and
structured types. None of them passes this check. `with_portable_strings` turns the unicode variables of an xarray
Dataset into variable-length strings, which zarr-python writes as `string` + `vlen-utf8`.

A registered extension is not core, and not every reader implements it: `READER_EXTENSION_DATA_TYPES` says which
extension data types each reader checked here opens (TensorStore 0.1.86 refuses `string`: "string data type is not
one of the supported data types"). `reader_problems` names the arrays a reader cannot open. An attention store of
schema v2 or later promises that every reader opens every array (its texts are bytes + offsets), so for one
`portability_problems` also counts any array a reader of the table cannot open; results datasets (causal,
explanations) keep `string` coordinates, which zarr-python and xarray read and TensorStore does not.

The check reads the metadata documents themselves (through fsspec), as another implementation would, and not
zarr-python's parsed view of them.
"""

from __future__ import annotations

import json
import re

import fsspec
import xarray as xr
import zarr

from storage_schemas.attention_store import READABLE_SCHEMA_VERSIONS, SCHEMA_NAME, readable_by_every_reader

# Data types of the Zarr v3 core specification (https://zarr-specs.readthedocs.io/en/latest/v3/core/index.html),
# besides the raw bit types "r8", "r16", ... (`_RAW_BITS`).
CORE_DATA_TYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)
_RAW_BITS = re.compile(r"^r([1-9][0-9]*)$")

_EXTENSIONS = "https://github.com/zarr-developers/zarr-extensions/tree/main"

# Registered extension data types this project may write -> their specification, and the codec they require.
REGISTERED_DATA_TYPES: dict[str, tuple[str, str]] = {
    "string": (f"{_EXTENSIONS}/data-types/string", "vlen-utf8"),
}

# Codecs of the core specification and registered codecs with a specification (zstd and crc32c are registered in
# zarr-extensions and implemented by zarr-python, zarrs, TensorStore, zarrita.js, ...).
CORE_CODECS = frozenset({"bytes", "transpose", "gzip", "blosc", "sharding_indexed", "crc32c", "zstd"})
REGISTERED_CODECS: dict[str, str] = {"vlen-utf8": f"{_EXTENSIONS}/codecs/vlen-utf8"}

# Reader -> the registered extension data types it opens (every reader opens the core ones). Checked by reading
# stores in tests/test_zarr_portability.py; TensorStore: version 0.1.86, zarr3 driver.
READER_EXTENSION_DATA_TYPES: dict[str, frozenset[str]] = {
    "zarr-python": frozenset({"string"}),
    "TensorStore": frozenset(),
}

CHUNK_GRIDS = frozenset({"regular"})
CHUNK_KEY_ENCODINGS = frozenset({"default", "v2"})

_ADVICE = {
    "fixed_length_utf32": "write strings as variable-length strings (numpy StringDType or object arrays; "
    "storage_schemas.portability.with_portable_strings does it for an xarray Dataset)",
    "null_terminated_bytes": "decode the bytes to str and write variable-length strings",
    "raw_bytes": "store the bytes in a uint8 array with an extra dimension",
    "variable_length_bytes": "store the bytes in a uint8 array with offsets, or as strings",
}


def _data_type_name(metadata: dict) -> str | None:
    data_type = metadata.get("data_type")
    name = data_type.get("name") if isinstance(data_type, dict) else data_type
    return name if isinstance(name, str) else None


def _node_paths(url: str, storage_options: dict | None) -> list[tuple[str, int]]:
    """(path inside the store, zarr format) of the root group and of every node below it."""
    root = zarr.open_group(url, mode="r", storage_options=storage_options)
    nodes = [("", root.metadata.zarr_format)]
    nodes += [(name, node.metadata.zarr_format) for name, node in root.members(max_depth=None)]
    return sorted(nodes)


def _codec_names(codecs: list, where: str, problems: list[str]) -> list[str]:
    """Names of `codecs` and of the codecs nested in sharding codecs (a malformed entry is a problem)."""
    names = []
    for codec in codecs:
        if isinstance(codec, str):  # the spec allows a bare name for a codec without configuration
            names.append(codec)
            continue
        if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
            problems.append(f"{where}: malformed codec entry {codec!r}")
            continue
        names.append(codec["name"])
        if codec["name"] == "sharding_indexed":
            configuration = codec.get("configuration", {})
            names += _codec_names(configuration.get("codecs", []), where, problems)
            names += _codec_names(configuration.get("index_codecs", []), where, problems)
    return names


def array_metadata_problems(where: str, metadata: dict) -> list[str]:
    """What in one array's `zarr.json` document (`metadata`) another Zarr v3 reader may not understand."""
    problems: list[str] = []
    data_type = metadata.get("data_type")
    name = data_type.get("name") if isinstance(data_type, dict) else data_type
    if not isinstance(name, str):
        problems.append(f"{where}: malformed data_type {data_type!r}")
    elif not (name in CORE_DATA_TYPES or _RAW_BITS.match(name) or name in REGISTERED_DATA_TYPES):
        advice = _ADVICE.get(name, "use a core data type")
        problems.append(
            f"{where}: data type {name!r} has no Zarr v3 specification (neither core nor a registered extension "
            f"this project allows: {sorted(REGISTERED_DATA_TYPES)}): {advice}"
        )
    codecs = _codec_names(metadata.get("codecs", []), where, problems)
    for codec in codecs:
        if codec not in CORE_CODECS and codec not in REGISTERED_CODECS:
            problems.append(
                f"{where}: codec {codec!r} is neither a Zarr v3 core codec {sorted(CORE_CODECS)} nor a registered "
                f"extension this project allows {sorted(REGISTERED_CODECS)}: use zstd, gzip or blosc"
            )
    if isinstance(name, str) and name in REGISTERED_DATA_TYPES:
        required = REGISTERED_DATA_TYPES[name][1]
        if required not in codecs:
            problems.append(f"{where}: data type {name!r} must be encoded with the {required!r} codec, got {codecs}")
    grid = metadata.get("chunk_grid", {})
    grid_name = grid.get("name") if isinstance(grid, dict) else grid
    if grid_name not in CHUNK_GRIDS:
        problems.append(f"{where}: chunk grid {grid_name!r} is not a core chunk grid {sorted(CHUNK_GRIDS)}")
    encoding = metadata.get("chunk_key_encoding", {})
    encoding_name = encoding.get("name") if isinstance(encoding, dict) else encoding
    if encoding_name not in CHUNK_KEY_ENCODINGS:
        problems.append(
            f"{where}: chunk key encoding {encoding_name!r} is not a core encoding {sorted(CHUNK_KEY_ENCODINGS)}"
        )
    if metadata.get("storage_transformers"):
        transformers = metadata["storage_transformers"]
        problems.append(f"{where}: storage transformers {transformers} are not part of Zarr v3 core")
    dimension_names = metadata.get("dimension_names")
    shape = metadata.get("shape", [])
    if dimension_names is None:
        problems.append(f"{where}: no dimension_names: give every array named dimensions")
    elif len(dimension_names) != len(shape) or any(not isinstance(dim, str) or not dim for dim in dimension_names):
        problems.append(f"{where}: dimension_names {dimension_names} do not name each of its {len(shape)} dimensions")
    return problems


def _array_documents(url: str, storage_options: dict | None) -> tuple[list[str], dict[str, dict]]:
    """(problems of nodes not in Zarr format 3, path inside the store -> the zarr.json of every array)."""
    filesystem, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    problems, arrays = [], {}
    for path, zarr_format in _node_paths(url, storage_options):
        where = f"/{path}"
        if zarr_format != 3:
            problems.append(f"{where}: written in Zarr format {zarr_format}, not 3")
            continue
        document = "/".join(part for part in (root.rstrip("/"), path, "zarr.json") if part)
        metadata = json.loads(filesystem.cat_file(document))
        if metadata.get("zarr_format") != 3:
            problems.append(f"{where}: zarr.json has zarr_format {metadata.get('zarr_format')!r}, not 3")
        if metadata.get("node_type") == "array":
            arrays[where] = metadata
    return problems, arrays


def _reader_problems(arrays: dict[str, dict], readers) -> list[str]:
    problems = []
    for where, metadata in arrays.items():
        name = _data_type_name(metadata)
        if name not in REGISTERED_DATA_TYPES:
            continue  # core (or reported as unspecified by array_metadata_problems)
        refusing = [reader for reader in readers if name not in READER_EXTENSION_DATA_TYPES[reader]]
        if refusing:
            problems.append(
                f"{where}: data type {name!r} is a registered extension, not core, and {' and '.join(refusing)} "
                f"cannot open it: store it with core data types (text: UTF-8 bytes in a uint8 array plus int64 "
                "offsets)"
            )
    return problems


def _check_readers(readers) -> tuple[str, ...]:
    readers = tuple(readers)
    unknown = [reader for reader in readers if reader not in READER_EXTENSION_DATA_TYPES]
    if unknown:
        raise ValueError(f"unknown readers {unknown}: choose from {sorted(READER_EXTENSION_DATA_TYPES)}")
    return readers


def reader_problems(
    url: str, storage_options: dict | None = None, readers=tuple(READER_EXTENSION_DATA_TYPES)
) -> list[str]:
    """The arrays of the Zarr hierarchy at `url` that one of `readers` (names of READER_EXTENSION_DATA_TYPES;
    default all) cannot open, each with the readers and what to change; [] if every reader opens every array."""
    readers = _check_readers(readers)
    return _reader_problems(_array_documents(url, storage_options)[1], readers)


def _promises_every_reader(url: str, storage_options: dict | None) -> bool:
    """Whether the group at `url` is an attention store whose schema promises that every reader opens every array."""
    group = zarr.open_group(url, mode="r", storage_options=storage_options)
    attributes = group.attrs.asdict()
    return (
        attributes.get("schema") == SCHEMA_NAME
        and attributes.get("schema_version") in READABLE_SCHEMA_VERSIONS
        and readable_by_every_reader(group)
    )


def portability_problems(url: str, storage_options: dict | None = None, readers=()) -> list[str]:
    """Everything in the Zarr hierarchy at `url` that another Zarr v3 implementation may not read; [] if none.

    `url`: a local path or fsspec URL (s3://...) of a Zarr group; `storage_options` go to its fsspec filesystem.
    Each problem names the node (its path inside the store, "/" for the root) and what to change. Arrays that one
    of `readers` (READER_EXTENSION_DATA_TYPES) cannot open are problems too; for an attention store of a schema
    that promises every reader (v2 on), every reader of the table is checked whatever `readers` says.
    """
    readers = _check_readers(readers)
    problems, arrays = _array_documents(url, storage_options)
    for where, metadata in arrays.items():
        problems += array_metadata_problems(where, metadata)
    if _promises_every_reader(url, storage_options):
        readers = tuple(READER_EXTENSION_DATA_TYPES)
    return problems + _reader_problems(arrays, readers)


def with_portable_strings(dataset: xr.Dataset) -> xr.Dataset:
    """`dataset` with every numpy unicode (`<U`) variable and coordinate as variable-length strings (object dtype),
    which zarr-python writes with the registered `string` data type instead of the unspecified
    `fixed_length_utf32`. Other variables are unchanged."""
    converted = {}
    for name, variable in dataset.variables.items():
        if variable.dtype.kind == "U":
            new = variable.astype(object)
            new.encoding = {key: value for key, value in variable.encoding.items() if key != "dtype"}
            converted[name] = new
    if not converted:
        return dataset
    result = dataset.copy()
    for name, variable in converted.items():
        if name in dataset.coords:
            result = result.assign_coords({name: variable})
        else:
            result[name] = variable
    return result


__all__ = [
    "CORE_CODECS",
    "CORE_DATA_TYPES",
    "READER_EXTENSION_DATA_TYPES",
    "REGISTERED_CODECS",
    "REGISTERED_DATA_TYPES",
    "array_metadata_problems",
    "portability_problems",
    "reader_problems",
    "with_portable_strings",
]
