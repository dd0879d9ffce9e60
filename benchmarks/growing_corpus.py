"""A corpus that grows every day, as a scheduled run sees it: what each day's increment costs, against one run over
the whole corpus from scratch.

rt-sentiment's held-out split (seed 0; its first --fraction only, for a quick run) is cut into --days equal parts
in corpus order and written day by day into a feed folder, day k as `day-<k>.csv` (columns `text`, `label`). After
each day, `effattn run --corpus FEED --model minilm --all --split all --no-train ...` runs in a subprocess (one
Prefect server on loopback serves every run, as `effattn serve` would have it); it appends to its store only the
examples it lacks and computes only the new shards (and the old partial last shard). Then one run from scratch
over every file at once (a fresh feed folder of the same name and a fresh run folder, so its outputs have the same
names). Printed per run: wall seconds, new examples, seconds per new example, each stage's time as the run
logged it, and how many examples the results measured one layer at a time and explained; then the sum of the
increments against the from-scratch run, and an estimate of what the same days cost when each day's run recomputes
everything (what effattn did before stores could grow).

A store that grows picks the examples it measures one layer and one head at a time, and those it explains, per
example by a share fixed on its first run (`--scope-examples` / `--explain-examples` over the first run's
examples), so that growth never changes an earlier example's draw. The daily runs therefore pass the counts that
give the first day the share the from-scratch run gets (--scope-examples S and --explain-examples E over the whole
split: S x first day / whole on every day), so that both measure the same share of the examples.

`--no-train` keeps one random head (seeded) for every run. With training, the first day would fine-tune a head on
the first day's rows and the store keeps that head for its life, while the from-scratch run fine-tunes one on all
of them: two different models, whose training costs differ with the corpus size, and whose stores cannot be compared.
`--split all` extracts every row of the feed (the rows are held-out examples already).

    .venv/bin/python benchmarks/growing_corpus.py                   # the whole held-out split, 2,562 examples
    .venv/bin/python benchmarks/growing_corpus.py --fraction 0.1 --explain-examples 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.whole_corpus import STAGES, attention_store_in, follow_stages
from tests.crash_harness import prefect_server

FEED_NAME = "feed"  # the corpus's name in the outputs: the same for the daily runs and the from-scratch run


def daily_parts(fraction: float, days: int) -> list:
    """rt-sentiment's held-out split (seed 0), its first `fraction` in corpus order, cut into `days` parts of equal
    size (up to one row): a list of `days` DataFrames with columns `text` and `label` (the class name)."""
    import numpy as np
    import pandas as pd

    from analysis.corpora import load_corpus
    from analysis.splits import select_split

    corpus = load_corpus("rt-sentiment")
    rows = select_split(len(corpus), corpus.labels, "held_out", seed=0, groups=corpus.groups)
    rows = rows[: round(fraction * len(rows))]
    if len(rows) < days:
        raise SystemExit(f"--fraction {fraction} leaves {len(rows)} examples for {days} days: choose a larger one")
    frame = pd.DataFrame(
        {"text": [corpus.texts[row] for row in rows], "label": [corpus.class_names[corpus.labels[row]] for row in rows]}
    )
    return [frame.iloc[part] for part in np.array_split(np.arange(len(frame)), days)]


def write_day(feed: Path, day: int, part) -> None:
    """Day `day`'s file of the feed folder (1-based)."""
    part.to_csv(feed / f"day-{day}.csv", index=False)


def stored_examples(run_dir: Path) -> int:
    """Examples in the attention store under `run_dir` (0 before the first run)."""
    from storage_schemas.attention_store import open_attention_store, store_layout

    if not any(run_dir.glob("*.zarr")):
        return 0
    return store_layout(open_attention_store(attention_store_in(str(run_dir)), mode="r")).n_examples


def measured_examples(run_dir: Path) -> dict[str, int | None]:
    """How many examples the run folder's results measured at the layer scope (the most over its targets) and how
    many its explanations explained (None where there are none): a store that grows picks them per example by a
    share fixed when its results were created, so their numbers grow with the store, where one run from scratch
    picks --scope-examples and --explain-examples of the whole."""
    import numpy as np
    import xarray as xr
    import zarr

    counts: dict[str, int | None] = {"layer_scope": None, "explained": None}
    for results in run_dir.glob("*.results.zarr"):
        dataset = xr.open_zarr(str(results), consolidated=False)
        layer = dataset.target_scope.values == "layer"
        if layer.any():
            counts["layer_scope"] = int(np.asarray(dataset.examples_measured.values)[..., layer].max())
    for explanations in run_dir.glob("*.explanations.zarr"):
        draw = zarr.open_group(str(explanations), mode="r").attrs.get("draw") or {}
        counts["explained"] = draw.get("drawn")
    return counts


def run_command(feed: Path, run_dir: Path, arguments, scale: float) -> list[str]:
    """The `effattn run` command line over the feed folder; the explained and scope example counts scaled by `scale`
    (the first day's share of the whole, for the daily runs)."""
    command = [str(Path(sys.executable).parent / "effattn"), "run", "--corpus", str(feed), "--model", "minilm"]
    command += ["--all", "--split", "all", "--no-train", "--run-dir", str(run_dir)]
    for option in ("variants", "shard_size"):
        if getattr(arguments, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(arguments, option))]
    for option in ("explain_examples", "scope_examples"):
        count = getattr(arguments, option)
        scaled = 0 if count == 0 else max(1, round(count * scale))
        command += [f"--{option.replace('_', '-')}", str(scaled)]
    return command


def timed_run(command: list[str], environment: dict[str, str], log_path: Path) -> dict:
    """Runs `command`, its output to `log_path`; returns {"wall": seconds, "stages": {stage: (status, seconds)}}."""
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=environment
        )
        stages, _ = follow_stages(process, log, started)
        process.wait()
    if process.returncode != 0:
        raise SystemExit(f"effattn run failed (exit {process.returncode}); its log: {log_path}")
    return {"wall": time.perf_counter() - started, "stages": stages}


def print_table(rows: list[tuple[str, dict]]) -> None:
    """One line per run: wall seconds, new examples, seconds per new example, each stage's seconds."""
    print(
        f"\n{'run':<8} {'wall s':>8} {'new ex':>7} {'s/new ex':>9} "
        + " ".join(f"{stage:>9}" for stage in STAGES)
        + f" {'stages s':>9} {'layer-scope ex':>14} {'explained':>9}"
    )
    for label, run in rows:
        per_example = run["wall"] / run["new_examples"] if run["new_examples"] else float("nan")
        seconds = [run["stages"].get(stage, ("-", 0.0))[1] for stage in STAGES]
        print(
            f"{label:<8} {run['wall']:8.1f} {run['new_examples']:7d} {per_example:9.3f} "
            + " ".join(f"{second:9.1f}" for second in seconds)
            + f" {sum(seconds):9.1f} {str(run['layer_scope']):>14} {str(run['explained']):>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0, help="the first F of the held-out split (0 < F <= 1)")
    parser.add_argument("--days", type=int, default=5, help="daily parts of equal size")
    parser.add_argument("--variants", help="comma-separated efficient-attention variants (default: the run's)")
    parser.add_argument("--explain-examples", type=int, default=32, help="explained by the from-scratch run")
    parser.add_argument(
        "--scope-examples", type=int, default=32, help="measured per layer and head by the from-scratch run"
    )
    parser.add_argument("--shard-size", type=int, help="examples per shard (default: the run's, which fits 256 MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--json", help="write the figures here too")
    arguments = parser.parse_args()
    if not 0 < arguments.fraction <= 1 or arguments.days < 1:
        raise SystemExit("--fraction must be in (0, 1] and --days at least 1")
    parts = daily_parts(arguments.fraction, arguments.days)
    base = Path(tempfile.mkdtemp(prefix="effattn-growing-corpus-"))
    print(f"{sum(map(len, parts))} examples in {arguments.days} daily parts of {[len(p) for p in parts]}; under {base}")
    growing_feed, scratch_feed = base / "daily" / FEED_NAME, base / "scratch" / FEED_NAME
    growing_runs, scratch_runs = base / "daily" / "runs", base / "scratch" / "runs"
    for folder in (growing_feed, scratch_feed):
        folder.mkdir(parents=True)
    days: list[dict] = []
    first_day_share = len(parts[0]) / sum(map(len, parts))  # the counts of the daily runs: the same share
    try:
        with prefect_server(base / "prefect") as environment:
            for day, part in enumerate(parts, start=1):
                write_day(growing_feed, day, part)
                before = stored_examples(growing_runs)
                command = run_command(growing_feed, growing_runs, arguments, first_day_share)
                run = timed_run(command, environment, base / f"day-{day}.log")
                new = stored_examples(growing_runs) - before
                days.append({**run, "new_examples": new, **measured_examples(growing_runs), "command": command})
            for day, part in enumerate(parts, start=1):
                write_day(scratch_feed, day, part)
            command = run_command(scratch_feed, scratch_runs, arguments, 1.0)
            scratch = {**timed_run(command, environment, base / "scratch.log"), "command": command}
            scratch.update(new_examples=stored_examples(scratch_runs), **measured_examples(scratch_runs))
    except BaseException:
        print(f"stopped; the feed, run folders and logs stay in {base}", file=sys.stderr)
        raise
    if not arguments.keep:
        shutil.rmtree(base, ignore_errors=True)

    print("\ncommand lines:")
    for label, run in [*((f"day {k}", run) for k, run in enumerate(days, start=1)), ("scratch", scratch)]:
        print(f"  {label}: {' '.join(run['command'])}")
    print_table([*((f"day {k}", run) for k, run in enumerate(days, start=1)), ("scratch", scratch)])
    if sum(run["new_examples"] for run in days) != scratch["new_examples"]:
        print(
            f"NOTE: the days stored {sum(r['new_examples'] for r in days)} examples, scratch {scratch['new_examples']}"
        )

    figures = {}
    for measure, of in (
        ("wall", lambda run: run["wall"]),
        ("stages", lambda run: sum(s for _, s in run["stages"].values())),
    ):
        increments, whole = sum(of(run) for run in days), of(scratch)
        # each day recomputing everything: a from-scratch run of that day's size, scaled linearly from this one
        recompute = sum(whole * k / arguments.days for k in range(1, arguments.days + 1))
        figures[measure] = {"increments": increments, "scratch": whole, "recompute_estimate": recompute}
        print(
            f"{measure:>6}: the {arguments.days} increments {increments:.1f} s against one from-scratch run "
            f"{whole:.1f} s: {increments / whole:.2f}x (target <= 1.2x); each day recomputing everything, estimated "
            f"as scratch x k/{arguments.days} summed over the days: {recompute:.1f} s ({recompute / whole:.2f}x)"
        )
    print(
        "(wall includes each run's start-up: imports, loading the model, starting the Dask cluster; 'stages' is the "
        "sum of the stage times the runs logged. The recompute figure is an estimate, not a measurement. "
        "layer-scope ex and explained: examples the store's results measured one layer at a time and explained, "
        "after that run; a store that grows keeps the share it picked on its first day, one run from scratch picks "
        "the option's count of the whole.)"
    )
    if arguments.keep:
        print(f"run folders kept: {growing_runs} (daily), {scratch_runs} (from scratch); logs in {base}")
    if arguments.json:
        Path(arguments.json).write_text(
            json.dumps({"fraction": arguments.fraction, "days": days, "scratch": scratch, "totals": figures}, indent=2)
        )


if __name__ == "__main__":
    main()
