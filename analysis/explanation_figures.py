"""The explanation results in the report: ERASER curves per method (one figure) and a table of AOPC and Kendall τ.

Plain functions on the results as an xarray Dataset (xarray.open_zarr of storage_schemas.explanation_results);
`explanation_section_html` draws the figure into the report folder and returns the report's HTML section.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from analysis.explanations import ATTENTION_SOURCE, ExplanationMethod
from analysis.report_figures import save_figure, variant_colour

FIGURE_NAME = "explanation-faithfulness.png"
SOURCE_COLOURS = {ATTENTION_SOURCE: "#d62728", "model": "#000000", "random": "#7f7f7f"}
AGGREGATION_STYLES = {"last-layer": "-", "all-layers": "--", "rollout": ":"}
MODEL_STYLES = {"input-x-gradient": "-.", "integrated-gradients": "-", "leave-one-out": "--"}


def _method_style(name: str, index: int) -> dict:
    method = ExplanationMethod.parse(name)
    if method.kind == "matrices":
        colour = SOURCE_COLOURS.get(method.source) or variant_colour(method.source, index)
        return {"color": colour, "linestyle": AGGREGATION_STYLES[method.aggregation]}
    if method.kind == "model":
        return {"color": SOURCE_COLOURS["model"], "linestyle": MODEL_STYLES[method.name]}
    return {"color": SOURCE_COLOURS["random"], "linestyle": "-", "linewidth": 2.5, "alpha": 0.6}


def mean_curves(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """{metric: [method, k]} the faithfulness curves averaged over the examples (NaN ignored)."""
    values = dataset["faithfulness"].values  # [method, metric, k, example]
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
            panel.plot(percents, curve[index], marker="o", markersize=3, label=name, **_method_style(name, index))
        panel.set_xscale("log")
        panel.set_xticks(percents, [f"{k:g}" for k in percents])
        panel.set_xlabel("k: % of removable tokens " + ("removed" if metric == "comprehensiveness" else "kept"))
        panel.set_ylabel(f"{metric} (probability drop)")
        panel.set_title(metric + (" (higher is more faithful)" if metric == "comprehensiveness"
                                  else " (lower is more faithful)"), fontsize=10)
        panel.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    return figure


def explanation_table_rows(dataset: xr.Dataset) -> list[list[str]]:
    """One row per method: name, mean AOPC comprehensiveness, sufficiency, mean Kendall τ against each reference
    (formatted; '—' where not measured)."""
    aopc = dataset["aopc"].values  # [method, metric, example]
    tau = dataset["kendall_tau"].values  # [method, reference, example]

    def mean(values: np.ndarray) -> str:
        values = values[~np.isnan(values)]
        return f"{values.mean():.4f}" if len(values) else "—"

    rows = []
    for index, name in enumerate(dataset["explainer"].values):
        rows.append([str(name)] + [mean(aopc[index, m]) for m in range(aopc.shape[1])]
                    + [mean(tau[index, r]) for r in range(tau.shape[1])])
    return rows


def explanation_section_html(dataset: xr.Dataset, out: str | Path) -> str:
    """Draw the curves into `out` and return the report's explanation section (figure, table, minimality)."""
    save_figure(faithfulness_curves_figure(dataset), Path(out) / FIGURE_NAME)
    metrics = [str(metric) for metric in dataset["metric"].values]
    references = [str(reference) for reference in dataset["reference"].values]
    headers = ["method"] + [f"AOPC {metric}" for metric in metrics] + [f"Kendall τ vs {r}" for r in references]
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if column else ""}>{html.escape(cell)}</td>'
                                    for column, cell in enumerate(row)) + "</tr>"
                   for row in explanation_table_rows(dataset))
    share = dataset["minimal_share"].values if "minimal_share" in dataset else np.array([])
    minimality = ("" if not np.isfinite(share).any() else
                  "<p>Simplex rows whose support is minimal, per layer: "
                  + ", ".join(f"layer {layer}: {'—' if np.isnan(value) else f'{100 * value:.1f} %'}"
                              for layer, value in enumerate(share)) + ".</p>")
    examples = dataset.sizes["example"]
    return (
        "<h2>Does attention explain the prediction?</h2>"
        f'<figure><a href="{FIGURE_NAME}"><img src="{FIGURE_NAME}" alt="ERASER curves"></a><figcaption>ERASER '
        f"faithfulness over {examples} examples (DeYoung et al. 2020): the drop of the predicted class's probability "
        "when the top k % tokens of each method are removed (comprehensiveness) or are the only ones kept "
        "(sufficiency). A removed token is replaced by the mask token with attention kept off it; special tokens "
        "are never removed. Red: raw attention; colours: efficient variants; line style: aggregation (solid last "
        "layer, dashed all layers, dotted rollout); black: gradient and occlusion baselines; grey: random."
        "</figcaption></figure>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" + minimality
    )
