"""Do two effattn versions write the same outputs? Compare two run folders made by the same command.

Every Zarr store below each folder (attention stores, causal and explanation results) is matched by its relative
path, and every array is compared value by value (NaN equal to NaN) with its dims, dtype, shape, chunks and fill
value; group and array attributes are compared too, apart from what differs between any two runs by design:
creation times, absolute paths, run durations and shard identities (fresh random tokens per written shard).

    # run the same command with each version, into two folders, then:
    .venv/bin/python benchmarks/same_outputs.py RUN_DIR_BEFORE RUN_DIR_AFTER

    # or let the script make both runs: BEFORE_TREE is a checkout of the earlier version (e.g. a git worktree)
    .venv/bin/python benchmarks/same_outputs.py --run BEFORE_TREE

Prints one line per store and per difference; exits 0 when everything compared equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parent.parent
# Attribute keys whose values differ between any two runs of one command.
VOLATILE_KEYS = frozenset(
    {
        "created",
        "updated",
        "shard_identities",
        "shard_inputs",
        "inputs",
        "store",
        "store_url",
        "results",
        "path",
        "url",
        "seconds",
        "started",
        "finished",
        "elapsed",
        "duration",
        "wall_seconds",
        "run_dir",
        "report_dir",
        "run_id",
        "flow_run_name",
        "started_seconds",
        "first_run",
    }
)
# Arrays whose values are times, which differ between any two runs of one command.
VOLATILE_ARRAYS = frozenset({"added_at"})
COMMAND = [
    "run",
    "--corpus",
    "rt-sentiment",
    "--model",
    "minilm",
    "--limit",
    "24",
    "--no-train",
    "--explain-examples",
    "8",
    "--variants",
    "effective,stochastic,simplex",
    "--batch-size",
    "8",
    "--shard-size",
    "8",
]


def stores_below(folder: Path) -> dict[str, Path]:
    """Relative path -> path of every Zarr v3 store (a folder with a zarr.json) directly holding a group."""
    found = {}
    for meta in sorted(folder.rglob("zarr.json")):
        store = meta.parent
        if any((parent / "zarr.json").exists() for parent in store.parents if folder in parent.parents):
            continue  # a member of an enclosing store
        found[str(store.relative_to(folder))] = store
    return found


def without_volatile(value: Any, folders: tuple[str, ...]) -> Any:
    """`value` with the volatile keys dropped at every depth and absolute run folders replaced by a placeholder."""
    if isinstance(value, dict):
        return {key: without_volatile(item, folders) for key, item in value.items() if key not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [without_volatile(item, folders) for item in value]
    if isinstance(value, str):
        for folder in folders:
            value = value.replace(folder, "<run-dir>")
        return value
    return value


def compare_stores(before: Path, after: Path) -> list[str]:
    """The differences between two stores, one line each (empty: equal)."""
    folders = tuple(sorted({str(before.parent), str(after.parent)}, key=len, reverse=True))  # longest first
    left, right = zarr.open_group(str(before), mode="r"), zarr.open_group(str(after), mode="r")
    differences = []
    left_members, right_members = dict(left.members(max_depth=None)), dict(right.members(max_depth=None))
    for name in sorted(set(left_members) ^ set(right_members)):
        differences.append(f"{name}: only in {'before' if name in left_members else 'after'}")
    pairs = [("", left, right)] + [
        (name, left_members[name], right_members[name]) for name in sorted(set(left_members) & set(right_members))
    ]
    for name, one, other in pairs:
        label = name or "/"
        if without_volatile(dict(one.attrs), folders) != without_volatile(dict(other.attrs), folders):
            keys = sorted(set(one.attrs) | set(other.attrs))
            changed = [
                key
                for key in keys
                if without_volatile(one.attrs.get(key), folders) != without_volatile(other.attrs.get(key), folders)
                and key not in VOLATILE_KEYS
            ]
            differences.append(f"{label}: attributes differ: {changed}")
        if isinstance(one, zarr.Array) != isinstance(other, zarr.Array):
            differences.append(f"{label}: an array in one store and a group in the other")
            continue
        if not isinstance(one, zarr.Array):
            continue
        for field in ("shape", "dtype", "chunks", "fill_value"):
            if str(getattr(one, field)) != str(getattr(other, field)):
                differences.append(f"{label}: {field} {getattr(one, field)} != {getattr(other, field)}")
        if name in VOLATILE_ARRAYS:
            continue
        if one.shape == other.shape and not np.array_equal(one[...], other[...], equal_nan=one.dtype.kind in "fc"):
            values, others = np.asarray(one[...]), np.asarray(other[...])
            unequal = values != others
            if values.dtype.kind in "fc":
                unequal &= ~(np.isnan(values) & np.isnan(others))
            largest = ""
            if values.dtype.kind in "fciu":
                gap = np.abs(values.astype(np.float64) - others.astype(np.float64))[unequal]
                largest = f", largest |difference| {gap.max():.3g}"
            differences.append(f"{label}: {int(unequal.sum())} of {values.size} values differ{largest}")
    return differences


def compare_folders(before: Path, after: Path) -> int:
    left, right = stores_below(before), stores_below(after)
    failures = 0
    for name in sorted(set(left) | set(right)):
        if name not in left or name not in right:
            print(f"{name}: only {'before' if name in left else 'after'}")
            failures += 1
            continue
        differences = compare_stores(left[name], right[name])
        print(f"{name}: {'equal' if not differences else f'{len(differences)} differences'}")
        for line in differences:
            print(f"    {line}")
        failures += bool(differences)
    if not left:
        print(f"no Zarr store below {before}")
        return 1
    return int(failures > 0)


def run_command(tree: Path, run_dir: Path) -> None:
    """`effattn run` with COMMAND, the package imported from `tree` (this venv's interpreter)."""
    environment = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-m", "flows.cli", *COMMAND, "--run-dir", str(run_dir)]
    print("$", " ".join(command), f"(in {tree})", flush=True)
    subprocess.run(command, cwd=tree, env=environment, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="RUN_DIR_BEFORE RUN_DIR_AFTER")
    parser.add_argument(
        "--run", type=Path, metavar="BEFORE_TREE", help="make both runs: the earlier version's checkout, then this one"
    )
    arguments = parser.parse_args(argv)
    if arguments.run:
        work = Path(tempfile.mkdtemp(prefix="same-outputs-"))
        run_command(arguments.run.resolve(), work / "before")
        run_command(ROOT, work / "after")
        return compare_folders(work / "before", work / "after")
    if len(arguments.folders) != 2:
        parser.error("give two run folders, or --run BEFORE_TREE")
    return compare_folders(*arguments.folders)


if __name__ == "__main__":
    sys.exit(main())
