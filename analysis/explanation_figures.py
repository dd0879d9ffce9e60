"""The explanation results in the report: ERASER curves per method (one figure) and a table of AOPC and Kendall τ.

Plain functions on the results as an xarray Dataset (xarray.open_zarr of storage_schemas.explanation_results);
`explanation_section_html` draws the figure into the report folder and returns the report's HTML section. Each
method's line is drawn as its record says (analysis.explainers, `style`).
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from analysis.explainers import explainer_record
from analysis.report_figures import save_figure

FIGURE_NAME = "explanation-faithfulness.png"


def mean_curves(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """{metric: [method, k]} the faithfulness curves averaged over the examples where each method is testable (an
    efficient method only where its matrices differ from A; NaN ignored)."""
    values = dataset["faithfulness"].values  # [method, metric, k, example]
    if "testable" in dataset:
        values = np.where((dataset["testable"].values != 0)[:, None, None, :], values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a method with no measured example
        means = np.nanmean(values, axis=-1)
    return {str(metric): means[:, index] for index, metric in enumerate(dataset["metric"].values)}


def faithfulness_curves_figure(dataset: xr.Dataset) -> Figure:
    """Comprehensiveness (left; higher = more faithful) and sufficiency (right; lower = more faithful) against
    k, one line per method, mean over the examples."""
    curves = mean_curves(dataset)
    percents = dataset["k"].values
    methods = [str(name) for name in dataset["explainer"].values]
    figure = Figure(figsize=(11, 4.6))
    axes = figure.subplots(1, 2)
    for panel, (metric, curve) in zip(axes, curves.items()):
        for index, name in enumerate(methods):
            panel.plot(
                percents, curve[index], label=name, **{"marker": "o", "markersize": 3, **explainer_record(name).style}
            )
        panel.set_xscale("log")
        panel.set_xticks(percents, [f"{k:g}" for k in percents])
        panel.set_xlabel("k: % of removable tokens " + ("removed" if metric == "comprehensiveness" else "kept"))
        panel.set_ylabel(f"{metric} (probability drop)")
        panel.set_title(
            metric + (" (higher is more faithful)" if metric == "comprehensiveness" else " (lower is more faithful)"),
            fontsize=10,
        )
        panel.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    return figure


def _missing(number) -> bool:
    return number is None or (isinstance(number, float) and np.isnan(number))


def _interval(item: dict | None) -> str:
    if not item or _missing(item.get("mean")):
        return "—"
    if _missing(item.get("low")):
        return f"{item['mean']:.4f}"
    return f"{item['mean']:.4f} [{item['low']:.4f}, {item['high']:.4f}]"


def ranking_table_rows(ranking: list[dict], metrics: list[str], references: list[str]) -> list[list[str]]:
    """One row per explainer, as the explanation stage ranked them (the results' `ranking` attribute): name, n, AOPC
    of each metric and Kendall τ against each reference with 95 % intervals, and comprehensiveness split by length
    against the head dim (with n)."""
    rows = []
    for entry in ranking:
        split = [f"{_interval(value)} (n = {value['n']})" for value in entry["by_length"].values()]
        rows.append(
            [entry["method"], str(entry["n"])]
            + [_interval(entry.get(metric)) for metric in metrics]
            + [_interval(entry["kendall_tau"].get(reference)) for reference in references]
            + split
        )
    return rows


def comparison_table_rows(comparisons: list[dict]) -> list[list[str]]:
    """One row per efficient method against its raw twin (the results' `comparisons`)."""
    return [
        [
            item["method"],
            item["twin"],
            str(item["n"]),
            str(item["not_testable"]),
            "—" if _missing(item.get("low")) else f"{item['mean']:+.4f} [{item['low']:+.4f}, {item['high']:+.4f}]",
            item["answer"],
        ]
        for item in comparisons
    ]


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if column else ''}>{html.escape(cell)}</td>" for column, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def explanation_section_html(dataset: xr.Dataset, out: str | Path) -> str:
    """Draw the curves into `out` and return the report's explanation section: which examples were explained, the
    comparisons of efficient methods with their raw twins, the ranking of every explainer (both as the explanation
    stage wrote them into the results' attributes), the figure and minimality."""
    save_figure(faithfulness_curves_figure(dataset), Path(out) / FIGURE_NAME)
    metrics = [str(metric) for metric in dataset["metric"].values]
    references = [str(reference) for reference in dataset["reference"].values]
    attributes = dataset.attrs
    ranking, comparisons = attributes.get("ranking") or [], attributes.get("comparisons") or []
    lengths = list(ranking[0]["by_length"]) if ranking else []
    ranking_html = _html_table(
        ["method", "n"]
        + [f"AOPC {metric} [95 % CI]" for metric in metrics]
        + [f"Kendall τ vs {r} [95 % CI]" for r in references]
        + [f"AOPC comprehensiveness, {g}" for g in lengths],
        ranking_table_rows(ranking, metrics, references),
    )
    methods_html = (
        "<dl>"
        + "".join(
            f"<dt>{html.escape(name)}</dt><dd>{html.escape(explainer_record(name).description)}</dd>"
            for name in (str(name) for name in dataset["explainer"].values)
        )
        + "</dl>"
    )
    comparison_html = _html_table(
        [
            "efficient method",
            "raw twin",
            "n (E ≠ A)",
            "explained with E = A",
            "Δ AOPC comprehensiveness [95 % CI]",
            "answer",
        ],
        comparison_table_rows(comparisons),
    )
    # results of a store that grows keep the draw's counts in their attribute `draw` (their settings do not change)
    draw = attributes.get("draw") or (attributes.get("settings") or {}).get("draw") or {}
    how = "chosen by a keyed draw per example" if "share" in draw else "drawn (seeded)"
    drawn = (
        f"{draw.get('drawn')} examples explained, {how} from the {draw.get('testable')} "
        f"{draw.get('rule', '')}; {draw.get('not_testable')} examples of the store are not testable (there E = A, "
        "so every efficient attribution is raw attention's)."
        if draw
        else ""
    )
    share = dataset["minimal_share"].values if "minimal_share" in dataset else np.array([])
    minimality = (
        ""
        if not np.isfinite(share).any()
        else "<p>Simplex rows whose support is minimal, per layer: "
        + ", ".join(
            f"layer {layer}: {'—' if np.isnan(value) else f'{100 * value:.1f} %'}" for layer, value in enumerate(share)
        )
        + ".</p>"
    )
    examples = dataset.sizes["example"]
    return (
        "<h2>Does attention explain the prediction?</h2>"
        f"<p>{html.escape(drawn)}</p>"
        "<h3>Efficient attention against raw and norm-based attention</h3>"
        "<p>Paired over the examples where the efficient matrices differ from A in the layers the aggregation reads; "
        "a positive difference means efficient attention's top tokens matter more to the prediction.</p>"
        + comparison_html
        + "<h3>Every explainer</h3>"
        + ranking_html
        + "<details><summary>What each method is</summary>"
        + methods_html
        + "</details>"
        + f'<figure><a href="{FIGURE_NAME}"><img src="{FIGURE_NAME}" alt="ERASER curves"></a><figcaption>ERASER '
        f"faithfulness over {examples} examples (DeYoung et al. 2020; efficient methods over the examples where they "
        "differ from A): the drop of the predicted class's probability "
        "when the top k % tokens of each method are removed (comprehensiveness) or are the only ones kept "
        "(sufficiency). A removed token is replaced by the mask token with attention kept off it; special tokens "
        "are never removed. Red: raw attention; colours: efficient variants; line style: aggregation (solid last "
        "layer, dashed all layers, dotted rollout), thin with squares: norm-based; black: gradient, occlusion and "
        "conservative-propagation baselines; grey: random."
        "</figcaption></figure>" + minimality
    )
