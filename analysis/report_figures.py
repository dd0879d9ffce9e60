"""The report's figures, as plain functions on arrays and xarray objects (matplotlib, no pyplot state).

Every figure function returns a `matplotlib.figure.Figure` (Agg canvas: works without a display, in any thread);
`save_figure` writes it as PNG. The captions that say how to read each figure are in analysis.report_html.
Shapes: `[example, layer, head]` diagnostics as in storage_schemas.efficient_store, `[L, L]` attention blocks of
one example, layer and head (real tokens only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib import colors
from matplotlib.figure import Figure

from analysis.variants import VARIANTS, variant_record

# Colours of variants a store holds but this process has not registered (each registered one has its own).
FALLBACK_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
DPI = 100
# Values at or below this are drawn in the first bin of the log-scale histograms (exact zeros included).
LOG_FLOOR = 1e-16


def variant_colour(variant: str, index: int = 0) -> str:
    """The variant's colour, the same in every figure (its record's; `index` picks a fallback for others)."""
    return variant_record(variant).colour if variant in VARIANTS else FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG at `path` (DPI dots per inch) and return the path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=DPI)
    return path


# --- tokens and choices ---------------------------------------------------------------------------------------


def load_local_tokenizer(name_or_path: str | None) -> Any | None:
    """The tokenizer recorded in a store (`tokenizer.name_or_path`), from local files only; None when it cannot
    be loaded (a folder that is gone, a hub name that is not cached): labels then fall back to token ids. Never
    downloads."""
    if not name_or_path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "no tokenizer": labels fall back to ids
        return None


def token_labels(token_ids: Sequence[int], tokenizer: Any | None = None) -> list[str]:
    """Readable labels for the tokens of one example: the tokenizer's token strings (`##` word pieces and `Ġ`
    spaces kept as the tokenizer writes them), or the ids as text without a tokenizer."""
    ids = [int(token) for token in token_ids]
    if tokenizer is None:
        return [str(token) for token in ids]
    try:
        tokens = tokenizer.convert_ids_to_tokens(ids)
    except Exception:  # noqa: BLE001 - a tokenizer that does not know these ids: fall back to ids
        return [str(token) for token in ids]
    return [str(token) if token is not None else str(token_id) for token, token_id in zip(tokens, ids)]


def choose_examples(length: np.ndarray, null_dim: np.ndarray, count: int = 3, max_length: int = 48) -> list[int]:
    """Examples worth drawing: `count` examples whose attention has a null space in some head (null_dim > 0),
    spread over their lengths (the 10th, 50th and 90th percentile of length for count = 3), preferring
    lengths <= `max_length` so the token labels stay readable. Falls back to the longest examples when no
    example has a null space. length: [example]; null_dim: [example, layer, head]. Returns store indices."""
    length = np.asarray(length)
    has_null = (np.asarray(null_dim) > 0).reshape(len(length), -1).any(axis=1) & (length > 0)
    candidates = np.flatnonzero(has_null)
    if len(candidates) == 0:
        candidates = np.flatnonzero(length > 0)
        candidates = candidates[np.argsort(-length[candidates], kind="stable")][:count]
        return sorted(int(index) for index in candidates)
    short = candidates[length[candidates] <= max_length]
    if len(short) >= count:
        candidates = short
    ordered = candidates[np.argsort(length[candidates], kind="stable")]
    quantiles = [0.5] if count == 1 else np.linspace(0.1, 0.9, count)
    chosen: list[int] = []
    for quantile in quantiles:
        position = int(round(quantile * (len(ordered) - 1)))
        # the nearest example not chosen yet
        for offset in range(len(ordered)):
            for candidate in (position + offset, position - offset):
                if 0 <= candidate < len(ordered) and int(ordered[candidate]) not in chosen:
                    chosen.append(int(ordered[candidate]))
                    break
            else:
                continue
            break
    return sorted(chosen)


def choose_head(null_norm_ratio: np.ndarray) -> tuple[int, int]:
    """The (layer, head) whose null part is largest: argmax of ||A - E||_F / ||A||_F. null_norm_ratio:
    [layer, head] of one example (NaN ignored)."""
    values = np.nan_to_num(np.asarray(null_norm_ratio, dtype=np.float64), nan=-np.inf)
    layer, head = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(layer), int(head)


# --- attention vs efficient vs null ----------------------------------------------------------------------------


def _symmetric_limit(blocks: Sequence[np.ndarray]) -> float:
    values = np.abs(np.concatenate([np.ravel(block) for block in blocks]))
    limit = float(np.percentile(values, 99.5)) if values.size else 1.0
    return limit if limit > 0 else 1.0


def attention_comparison_figure(
    attention: np.ndarray,
    efficient: Mapping[str, np.ndarray],
    labels: Sequence[str],
    title: str,
) -> Figure:
    """Heatmaps of one example's attention A [L, L], and per variant its efficient attention E [L, L] and null
    part A - E [L, L], with the tokens on both axes (rows: queries, columns: keys).

    One row per variant: A | E | A - E (A repeated in every row, so that each row compares on its own). One
    diverging colour scale for all panels (red positive, blue negative, white 0), linear up to the uniform weight
    1/L and logarithmic beyond, so that both the few large weights and the many small ones show.
    """
    variants = list(efficient)
    L = attention.shape[0]
    if attention.shape != (L, L) or len(labels) != L:
        raise ValueError(
            f"attention has shape {attention.shape} and there are {len(labels)} labels: expected [L, L] and L labels"
        )
    nulls = {variant: attention - efficient[variant] for variant in variants}
    limit = float(max(np.abs(block).max() for block in [attention, *efficient.values(), *nulls.values()]))
    limit = limit if limit > 0 else 1.0
    norm = colors.SymLogNorm(linthresh=1.0 / max(L, 1), linscale=1.0, vmin=-limit, vmax=limit, base=10)
    rows = max(len(variants), 1)
    label_size = float(np.clip(330 / max(L, 1), 5.0, 9.0))
    panel = 3.95
    figure = Figure(figsize=(13.4, rows * panel + 1.3), layout="constrained")
    grid = figure.subplots(rows, 3, squeeze=False, sharex=True, sharey=True)
    image = None
    for row, variant in enumerate(variants):
        panels = (
            (attention, "attention A"),
            (efficient[variant], f"efficient E ({variant})"),
            (nulls[variant], f"null part A − E ({variant})"),
        )
        for column, (matrix, heading) in enumerate(panels):
            axes = grid[row, column]
            image = axes.imshow(matrix, cmap="RdBu_r", norm=norm, interpolation="nearest", aspect="equal")
            axes.set_title(heading, fontsize=11)
            axes.set_xticks(range(L))
            axes.set_yticks(range(L))
            axes.tick_params(length=0, pad=1, labelsize=label_size, labelbottom=row == rows - 1, labelleft=column == 0)
    grid[-1, 0].set_xticklabels(labels, rotation=90)
    grid[0, 0].set_yticklabels(labels)
    for axes in grid[-1]:
        axes.tick_params(labelrotation=90, axis="x")
        axes.set_xlabel("key", fontsize=10)
    for axes in grid[:, 0]:
        axes.set_ylabel("query", fontsize=10)
    colorbar = figure.colorbar(
        image, ax=grid, shrink=0.5, aspect=40, pad=0.01, label="weight (linear up to 1/L, logarithmic beyond)"
    )
    decades = [10.0**k for k in range(-6, 2) if 1.5 / max(L, 1) < 10.0**k < limit / 1.5]
    positive = sorted({1.0 / max(L, 1), *decades, limit})
    colorbar.minorticks_off()
    colorbar.set_ticks([-value for value in reversed(positive)] + [0.0] + positive)
    colorbar.set_ticklabels(
        [f"{-value:.2g}" for value in reversed(positive)] + ["0"] + [f"{value:.2g}" for value in positive]
    )
    figure.suptitle(title, fontsize=13)
    return figure


# --- null-norm ratio against length -----------------------------------------------------------------------------


def null_norm_ratio_by_length(length: np.ndarray, null_norm_ratio: np.ndarray) -> dict[str, np.ndarray]:
    """Per distinct sequence length: {"length", "median", "p10", "p90", "count"} of ||A - E||_F / ||A||_F over
    every (example of that length, layer, head). length: [example]; null_norm_ratio: [example, layer, head]."""
    length = np.asarray(length)
    ratio = np.asarray(null_norm_ratio, dtype=np.float64).reshape(len(length), -1)
    lengths = np.unique(length[length > 0])
    rows = {"length": lengths, "median": [], "p10": [], "p90": [], "count": []}
    for value in lengths:
        chosen = ratio[length == value].ravel()
        chosen = chosen[np.isfinite(chosen)]
        rows["median"].append(np.median(chosen) if chosen.size else np.nan)
        rows["p10"].append(np.percentile(chosen, 10) if chosen.size else np.nan)
        rows["p90"].append(np.percentile(chosen, 90) if chosen.size else np.nan)
        rows["count"].append(chosen.size)
    return {key: np.asarray(value) for key, value in rows.items()}


def null_norm_ratio_figure(length: np.ndarray, null_norm_ratio: Mapping[str, np.ndarray], head_dim: int) -> Figure:
    """||A - E||_F / ||A||_F against the sequence length L, per variant: the median over (example, layer, head)
    of each length as a line, the 10th-90th percentile as a band; a vertical line at the head dimension d (for
    L <= d the null space is empty in general and every variant equals A). null_norm_ratio: {variant: [example,
    layer, head]}."""
    figure = Figure(figsize=(12, 5.2), layout="constrained")
    axes = figure.subplots()
    for index, (variant, ratio) in enumerate(null_norm_ratio.items()):
        stats = null_norm_ratio_by_length(length, ratio)
        colour = variant_colour(variant, index)
        axes.fill_between(stats["length"], stats["p10"], stats["p90"], color=colour, alpha=0.18, linewidth=0)
        axes.plot(
            stats["length"],
            stats["median"],
            color=colour,
            linewidth=2,
            marker="o",
            markersize=3,
            label=f"{variant}: median (band: 10th–90th percentile)",
        )
    axes.axvline(head_dim, color="black", linestyle="--", linewidth=1.2)
    top = axes.get_ylim()[1]
    axes.text(head_dim, top * 0.97, f"  head dim d = {head_dim}", va="top", ha="left", fontsize=11)
    axes.set_xlabel("sequence length L (real tokens)", fontsize=12)
    axes.set_ylabel("‖A − E‖ / ‖A‖  (null-norm ratio)", fontsize=12)
    axes.set_title("How much of the attention is in the null space, by sequence length", fontsize=13)
    axes.tick_params(labelsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=10, loc="upper left")
    return figure


# --- diagnostics distributions ----------------------------------------------------------------------------------


def _log_values(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return np.log10(np.maximum(np.abs(values), LOG_FLOOR))


def diagnostic_distributions_figure(
    diagnostics: Mapping[str, Mapping[str, np.ndarray]],
    length: np.ndarray,
    names: Sequence[str] = ("row_sum_error", "negative_mass"),
) -> Figure:
    """Histograms (log10 of the value, log-scale counts) of the per-matrix diagnostics `names` per variant, over
    the (example, layer, head) whose null space is not empty (the others are A itself: error 0). Values at or
    below LOG_FLOOR, exact zeros included, fall in the leftmost bin. diagnostics: {variant: {name: [example,
    layer, head]}} with `null_dim` among the names."""
    titles = {
        "row_sum_error": "row-sum error: max over the rows of |row sum of E − 1|",
        "negative_mass": "negative mass: sum of |negative entries of E| / L",
    }
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    panels = figure.subplots(1, len(names), squeeze=False)[0]
    all_logs = [
        _log_values(values[name][(values["null_dim"] > 0) & (np.asarray(length) > 0)[:, None, None]])
        for values in diagnostics.values()
        for name in names
    ]
    finite = np.concatenate(all_logs) if all_logs else np.array([0.0])
    low = np.log10(LOG_FLOOR) if finite.size == 0 else min(np.floor(finite.min()), 0.0)
    high = 1.0 if finite.size == 0 else max(np.ceil(finite.max()) + 0.5, 1.0)
    bins = np.linspace(low - 0.5, high, 60)
    for axes, name in zip(panels, names):
        for index, (variant, values) in enumerate(diagnostics.items()):
            chosen = (values["null_dim"] > 0) & (np.asarray(length) > 0)[:, None, None]
            logs = _log_values(values[name][chosen])
            zeros = int((logs <= np.log10(LOG_FLOOR)).sum())
            axes.hist(
                logs,
                bins=bins,
                histtype="step",
                linewidth=2,
                color=variant_colour(variant, index),
                label=f"{variant}: {logs.size} matrices ({zeros} of them ≤ 1e-16)",
            )
        axes.set_yscale("log")
        axes.set_xlabel(f"log10 {name.replace('_', ' ')}  (leftmost bin: ≤ 1e-16, including 0)", fontsize=11)
        axes.set_ylabel("matrices (example, layer, head)", fontsize=11)
        axes.set_title(titles.get(name, name), fontsize=12)
        axes.tick_params(labelsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=9, loc="upper center")
    return figure


# --- causal results: per head, per layer, minimality -----------------------------------------------------------


def model_indices(chosen: int | Sequence[int]) -> list[int]:
    """The model indices of the stored layers (or heads): a count stands for all of them, 0..count-1."""
    return list(range(chosen)) if isinstance(chosen, (int, np.integer)) else [int(index) for index in chosen]


def layer_head_grid(
    aggregates: xr.Dataset, metric: str, intervention: str, layers: int | Sequence[int], heads: int | Sequence[int]
) -> np.ndarray:
    """[stored layer, stored head] of `metric` (an aggregate, e.g. agreement_rate) for `intervention` at the
    targets of scope "head"; NaN where a head was not measured. aggregates: Dataset [intervention, target] with the
    coordinates target_scope, target_layer, target_head (model indices) and examples_measured; layers, heads: the
    model indices of the stored ones (counts: all of them)."""
    layers, heads = model_indices(layers), model_indices(heads)
    grid = np.full((len(layers), len(heads)), np.nan)
    row = aggregates.sel(intervention=intervention)
    for index in np.flatnonzero(np.asarray(aggregates["target_scope"].values) == "head"):
        if float(row["examples_measured"].values[index]) > 0:
            grid[
                layers.index(int(aggregates["target_layer"].values[index])),
                heads.index(int(aggregates["target_head"].values[index])),
            ] = float(row[metric].values[index])
    return grid


def scope_interventions(aggregates: xr.Dataset, scope: str) -> list[str]:
    """Interventions measured at some target of `scope` ("all", "layer", "head")."""
    scoped = np.asarray(aggregates["target_scope"].values) == scope
    measured = np.asarray(aggregates["examples_measured"].values)[:, scoped] > 0
    names = [str(name) for name in aggregates["intervention"].values]
    return [name for name, row in zip(names, measured) if row.any()]


def percent_limits(metric: str, grids: Sequence[np.ndarray], floor: float = 0.05) -> tuple[float, float]:
    """Colour limits in % for shares of `metric`: flip rates from 0 to their largest value (at least `floor`),
    agreement rates from 100 % minus that span to 100 %, so that a few percent of change stays visible."""
    values = np.concatenate([np.ravel(grid) for grid in grids]) if grids else np.array([])
    values = values[np.isfinite(values)]
    if metric == "agreement_rate":
        span = max(1.0 - (values.min() if values.size else 1.0), floor)
        return 100 * (1.0 - span), 100.0
    return 0.0, 100 * max(values.max() if values.size else 0.0, floor)


def _annotated_heatmap(axes, grid: np.ndarray, cmap: str, fontsize: float, limits: tuple[float, float]) -> Any:
    """Heatmap of shares [rows, columns] drawn in % between `limits`, each cell labelled with its value in %."""
    percent = 100 * grid
    low, high = limits
    image = axes.imshow(
        np.ma.masked_invalid(percent), cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest"
    )
    for (row, column), value in np.ndenumerate(percent):
        if np.isfinite(value):
            dark = (value - low) / max(high - low, 1e-12) > 0.6
            axes.text(
                column,
                row,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )
    return image


def head_scope_figure(
    aggregates: xr.Dataset,
    layers: int | Sequence[int],
    heads: int | Sequence[int],
    metrics: Sequence[str] = ("agreement_rate", "flip_rate"),
) -> Figure | None:
    """Per intervention measured at scope "head" (one head replaced at a time), a layer × head heatmap of each of
    `metrics` (shares in %, written in the cells; grey: not measured; one colour scale per metric, see
    percent_limits), labelled with the model's layer and head numbers (layers, heads: the stored ones' model
    indices, or counts). None when no head was measured."""
    interventions = scope_interventions(aggregates, "head")
    if not interventions:
        return None
    layer_numbers, head_numbers = model_indices(layers), model_indices(heads)
    layers, heads = len(layer_numbers), len(head_numbers)
    cmaps = {"agreement_rate": "Greens", "flip_rate": "Reds"}
    height = max(3.0, len(interventions) * (0.42 * layers + 1.3) + 0.3)  # at least 3 in: titles and colour bars fit
    figure = Figure(figsize=(13, height), layout="constrained")
    grid = figure.subplots(len(interventions), len(metrics), squeeze=False)
    cell_font = float(np.clip(110 / max(heads, 1), 5.5, 9.0))
    values = {
        (intervention, metric): layer_head_grid(aggregates, metric, intervention, layer_numbers, head_numbers)
        for intervention in interventions
        for metric in metrics
    }
    limits = {metric: percent_limits(metric, [values[key] for key in values if key[1] == metric]) for metric in metrics}
    for row, intervention in enumerate(interventions):
        for column, metric in enumerate(metrics):
            axes = grid[row, column]
            image = _annotated_heatmap(
                axes, values[intervention, metric], cmaps.get(metric, "viridis"), cell_font, limits[metric]
            )
            axes.set_title(f"{intervention}: {metric.replace('_', ' ')} (%)", fontsize=11)
            axes.set_xticks(range(heads), [str(head) for head in head_numbers])
            axes.set_yticks(range(layers), [str(layer) for layer in layer_numbers])
            axes.set_xlabel("head", fontsize=10)
            axes.set_ylabel("layer", fontsize=10)
            axes.tick_params(labelsize=9)
            axes.set_facecolor("#dddddd")
            figure.colorbar(image, ax=axes, fraction=0.04, pad=0.01)
    return figure


def layer_scope_figure(aggregates: xr.Dataset, layers: int | Sequence[int], metric: str = "flip_rate") -> Figure | None:
    """Interventions × layers heatmap of `metric` for the targets of scope "layer" (every head of one layer
    replaced at once), labelled with the model's layer numbers (layers: the stored ones' model indices, or a
    count). None when no layer was measured."""
    interventions = scope_interventions(aggregates, "layer")
    if not interventions:
        return None
    layer_numbers = model_indices(layers)
    layers = len(layer_numbers)
    values = np.full((len(interventions), layers), np.nan)
    scoped = np.flatnonzero(np.asarray(aggregates["target_scope"].values) == "layer")
    for row, intervention in enumerate(interventions):
        selected = aggregates.sel(intervention=intervention)
        for index in scoped:
            if float(selected["examples_measured"].values[index]) > 0:
                column = layer_numbers.index(int(aggregates["target_layer"].values[index]))
                values[row, column] = float(selected[metric].values[index])
    figure = Figure(figsize=(12, 0.45 * len(interventions) + 1.6), layout="constrained")
    axes = figure.subplots()
    image = _annotated_heatmap(
        axes, values, "Reds" if metric == "flip_rate" else "Greens", 10, percent_limits(metric, [values])
    )
    axes.set_xticks(range(layers))
    axes.set_xticklabels([f"layer {layer}" for layer in layer_numbers])
    axes.set_yticks(range(len(interventions)))
    axes.set_yticklabels(interventions)
    axes.tick_params(labelsize=10)
    axes.set_facecolor("#dddddd")
    axes.set_title(f"{metric.replace('_', ' ')} (%) when every head of one layer is replaced", fontsize=12)
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
    return figure


def minimality_curve(aggregates: xr.Dataset, target: str = "all") -> dict[str, Any] | None:
    """Agreement and flip rate against k, the number of weakest directions of col(T) removed from the effective
    projection (k = 0: efficient:<variant> itself), at `target`. aggregates: [intervention, target] with the
    coordinates intervention_kind, variant and removed_directions. {"k", "agreement_rate", "flip_rate": arrays
    [point], "variant": str}, or None without minimality probes."""
    # the parts of each intervention the results dataset records beside its name (no name is parsed here)
    names = [str(name) for name in aggregates["intervention"].values]
    kinds = [str(kind) for kind in aggregates["intervention_kind"].values]
    variants = [str(variant) for variant in aggregates["variant"].values]
    removed = [int(k) for k in aggregates["removed_directions"].values]
    probes = sorted((removed[row], row) for row, kind in enumerate(kinds) if kind == "minimality")
    if not probes:
        return None
    variant = variants[probes[0][1]]
    points = [(k, names[row]) for k, row in probes]
    efficient = [name for name, kind, of in zip(names, kinds, variants) if kind == "efficient" and of == variant]
    if efficient:
        points = [(0, efficient[0]), *points]
    selected = aggregates.sel(target=target)
    return {
        "k": np.array([k for k, _ in points]),
        "agreement_rate": np.array([float(selected["agreement_rate"].sel(intervention=name)) for _, name in points]),
        "flip_rate": np.array([float(selected["flip_rate"].sel(intervention=name)) for _, name in points]),
        "variant": variant,
    }


def minimality_figure(aggregates: xr.Dataset, head_dim: int, bar: float = 0.999) -> Figure | None:
    """The minimality probe: agreement and flip rate (target "all") against k removed directions, with the
    sufficiency bar. None without minimality probes."""
    curve = minimality_curve(aggregates)
    if curve is None:
        return None
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(curve["k"]))
    axes.plot(
        positions,
        100 * curve["agreement_rate"],
        marker="o",
        linewidth=2,
        color="#2ca02c",
        label="agreement with the original predictions",
    )
    axes.plot(positions, 100 * curve["flip_rate"], marker="s", linewidth=2, color="#d62728", label="flip rate")
    axes.axhline(100 * bar, color="black", linestyle="--", linewidth=1, label=f"sufficiency bar {100 * bar:.1f} %")
    axes.set_xticks(positions)
    axes.set_xticklabels([str(k) for k in curve["k"]])
    axes.set_xlabel(f"k: weakest directions of col(T) removed ({curve['variant']}; head dim {head_dim})", fontsize=11)
    axes.set_ylabel("% of examples", fontsize=11)
    axes.set_ylim(-3, 103)
    axes.set_title(
        "Minimality probe: every head of every layer gets A·P_k, col(T) without its k weakest directions", fontsize=12
    )
    axes.tick_params(labelsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=10, loc="center right")
    return figure
