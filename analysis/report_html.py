"""The report: one static `index.html` (no scripts, relative PNG paths) plus the PNG figures of
analysis.report_figures, made from a causal results dataset and the attention store it came from.

`ReportInputs` holds everything the report needs, already read from the stores (small: aggregates [intervention,
target], diagnostics [example, layer, head], and a few [L, L] blocks); `write_report` draws and writes it. Reading
the stores is the caller's business (tasks.report), so this module works on plain arrays and xarray objects.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from analysis import report_figures as figures
from analysis.interventions import KIND_DESCRIPTIONS
from analysis.variants import VARIANTS, variant_record

TABLE_METRICS = (
    ("agreement_rate", "agreement", "percent"),
    ("flip_rate", "flip rate", "percent"),
    ("largest_logit_change", "largest\u00a0|Δlogit|", "number"),
    ("mean_kl_divergence", "mean KL (nats)", "number"),
    ("accuracy", "accuracy", "percent"),
    ("examples_measured", "examples", "count"),
)
VERDICT_CLASSES = {"holds": "holds", "does not hold": "fails"}


@dataclass
class ExampleView:
    """One example drawn as heatmaps: its attention and each variant's efficient attention at one layer and head.

    attention: [L, L]; efficient: {variant: [L, L]}; labels: L token strings; null_norm_ratio: {variant: ratio of
    this block}."""

    index: int
    layer: int
    head: int
    labels: list[str]
    text: str
    label: str
    attention: np.ndarray
    efficient: dict[str, np.ndarray]
    null_norm_ratio: dict[str, float]


@dataclass
class ReportInputs:
    """What the report shows, read from a causal results dataset and its attention store.

    aggregates: Dataset [intervention, target] of storage_schemas.causal_results.AGGREGATES with the coordinates
    target_scope, target_layer, target_head, intervention_kind, variant, removed_directions.
    diagnostics: {variant: {name: [example, layer, head]}} (null_dim, null_norm_ratio, row_sum_error,
    negative_mass at least). length: [example]. attributes: the results' root attributes (provenance, claims,
    efficient_diagnostics, settings)."""

    results_url: str
    store_url: str
    attributes: dict[str, Any]
    aggregates: xr.Dataset
    diagnostics: dict[str, dict[str, np.ndarray]]
    length: np.ndarray
    layers: int | Sequence[int]  # model indices of the stored layers (a count: all of them)
    heads: int | Sequence[int]  # model indices of the stored heads (a count: all of them)
    head_dim: int
    examples: list[ExampleView] = field(default_factory=list)
    tokenizer_loaded: bool = True
    explanations: xr.Dataset | None = None  # explanation results (storage_schemas.explanation_results), if any
    captured: str = ""  # what the store holds of the model, e.g. "2 of 6 layers (0, 3), all 12 heads"


# --- formatting -------------------------------------------------------------------------------------------------


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    number = float(value)
    if np.isnan(number):
        return "—"
    if kind == "percent":
        return f"{100 * number:.2f} %"
    if kind == "count":
        return f"{int(number)}"
    return f"{number:.3g}"


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    row_classes: Sequence[str] | None = None,
    numeric_from: int | None = None,
) -> str:
    """An HTML table from already escaped cells; columns from `numeric_from` on are right-aligned."""
    head = "".join(f"<th>{cell}</th>" for cell in headers)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        cells = "".join(
            f'<td class="num">{cell}</td>'
            if numeric_from is not None and column >= numeric_from
            else f"<td>{cell}</td>"
            for column, cell in enumerate(row)
        )
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def model_description(model: Mapping[str, Any]) -> str:
    """'minilm with a fine-tuned classification head (BertForSequenceClassification, 6 layers x 12 heads, head
    dim 32)' from the store's `model` attribute."""
    head = model.get("head") or {}
    name = head.get("base_model") or model.get("name", "unknown model")
    trained = " with a fine-tuned classification head" if head.get("trained") else ""
    sizes = (
        f"{model.get('architecture', '?')}, {model.get('layers', '?')} layers × {model.get('heads', '?')} "
        f"heads ({model.get('kv_heads', '?')} kv heads), head dim {model.get('head_dim', '?')}, hidden "
        f"{model.get('hidden', '?')}"
    )
    return f"{name}{trained} ({sizes})"


def provenance_rows(inputs: ReportInputs) -> list[tuple[str, str]]:
    """(field, value) pairs of the provenance table, values as plain text."""
    attributes = inputs.attributes
    model, corpus = attributes.get("model", {}), attributes.get("corpus", {})
    settings = attributes.get("settings", {})
    versions = attributes.get("package_versions", {})
    rows = [
        ("model", model_description(model)),
        ("weights", str(model.get("weights_digest", "?"))),
        *([("captured", inputs.captured)] if inputs.captured else []),
        (
            "corpus",
            f"{corpus.get('name', '?')}, split {corpus.get('split', '?')}, "
            f"{corpus.get('example_count', len(inputs.length))} examples of {corpus.get('corpus_size', '?')}"
            f"; classes {', '.join(map(str, corpus.get('class_names', []))) or '—'}",
        ),
        ("corpus source", str(corpus.get("source", "?"))),
        (
            "examples",
            f"{len(inputs.length)} (lengths {int(inputs.length.min()) if len(inputs.length) else 0}–"
            f"{int(inputs.length.max()) if len(inputs.length) else 0} tokens, head dim {inputs.head_dim}); "
            f"scopes {', '.join(settings.get('scopes', []))}; layer and head scopes on "
            f"{settings.get('scope_examples') or 'all'} examples; seed {settings.get('seed', '?')}",
        ),
        ("attention store", inputs.store_url),
        ("causal results", inputs.results_url),
        ("results created", str(attributes.get("created", "?"))),
        ("report created", datetime.now(UTC).isoformat(timespec="seconds")),
        ("package versions", ", ".join(f"{name} {version}" for name, version in versions.items()) or "?"),
    ]
    try:
        import matplotlib

        rows[-1] = (rows[-1][0], rows[-1][1] + f"; figures: matplotlib {matplotlib.__version__}")
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the report
        pass
    return rows


def provenance_html(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_escape(key)}</th><td>{_escape(value)}</td></tr>" for key, value in rows)
    return f'<table class="provenance"><tbody>{body}</tbody></table>'


def verdict_class(verdict: str) -> str:
    """The CSS class of a verdict: holds, fails, untestable (not testable: the data cannot decide) or unknown."""
    return "untestable" if verdict.startswith("not testable") else VERDICT_CLASSES.get(verdict, "unknown")


def claims_html(claims: Sequence[Mapping[str, Any]]) -> str:
    """The findings first, then the identity checks in a table of their own, labelled as such, with the precision
    they were checked to (analysis.claims)."""
    findings = [row for row in claims if row.get("kind", "finding") != "identity"]
    identities = [row for row in claims if row.get("kind") == "identity"]
    rows = [
        [_escape(row["claim"]), f"<b>{_escape(row['verdict'])}</b>", _escape(row["measured"]), _escape(row["test"])]
        for row in findings
    ]
    page = "<h3>Findings</h3>" + _table(
        ["claim", "verdict", "measured", "test (rule of the verdict)"],
        rows,
        [verdict_class(row["verdict"]) for row in findings],
    )
    if identities:
        rows = [
            [
                _escape(row["claim"]),
                f"<b>{_escape(row['verdict'])}</b>",
                _escape(row.get("precision", "")),
                _escape(row["measured"]),
                _escape(row["test"]),
            ]
            for row in identities
        ]
        page += (
            '<h3>Identity checks</h3><p class="note">These hold by construction (linear algebra: E·T = A·T, '
            "(A − E)·T = 0, null-space noise adds nothing to the output). They check storage precision and "
            "the pipeline, not the claims of SEED.md; each is shown with the precision it was checked to.</p>"
            + _table(
                ["identity", "verdict", "precision", "measured", "test"],
                rows,
                [verdict_class(row["verdict"]) for row in identities],
            )
        )
    return page


def aggregate_rows(aggregates: xr.Dataset, target: str = "all") -> list[list[str]]:
    """Rows [intervention, what it injects, metrics...] at `target`, formatted (not escaped)."""
    selected = aggregates.sel(target=target)
    rows = []
    for index, name in enumerate(str(name) for name in aggregates["intervention"].values):
        if float(selected["examples_measured"].values[index]) <= 0:
            continue
        kind = (
            str(aggregates["intervention_kind"].values[index])
            if "intervention_kind" in aggregates
            else name.split(":", 1)[0]
        )  # results written before the coordinate
        rows.append(
            [name, KIND_DESCRIPTIONS.get(kind, kind)]
            + [
                _format(selected[metric].values[index], kind_)
                for metric, _, kind_ in TABLE_METRICS
                if metric in selected
            ]
        )
    return rows


def aggregates_html(aggregates: xr.Dataset, target: str = "all") -> str:
    headers = ["intervention", "injects"] + [label for metric, label, _ in TABLE_METRICS if metric in aggregates]
    rows = [[_escape(cell) for cell in row] for row in aggregate_rows(aggregates, target)]
    return _table(headers, rows, numeric_from=2)


def diagnostics_html(summary: Mapping[str, Mapping[str, float]]) -> str:
    columns = (
        ("matrices_with_null_space", "matrices with a null space", "count"),
        ("probability_distribution_share", "probability distributions", "percent"),
        ("mean_negative_mass", "mean negative mass", "number"),
        ("largest_row_sum_error", "largest row-sum error", "number"),
        ("mean_null_norm_ratio", "mean ‖A − E‖/‖A‖", "number"),
        ("converged_share", "solved to convergence", "percent"),
        ("mean_support_share", "mean support / L", "percent"),
    )
    rows = [
        [_escape(variant)] + [_format(values.get(key), kind) for key, _, kind in columns]
        for variant, values in summary.items()
    ]
    return _table(["variant"] + [label for _, label, _ in columns], rows, numeric_from=1)


# --- figures ----------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; font-size: 16px; line-height: 1.45;
       color: #1a1a1a; margin: 0; background: #fafafa; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 28px 60px; background: white; }
h1 { font-size: 28px; margin: 0 0 6px; } h2 { font-size: 22px; margin: 36px 0 10px; border-bottom: 2px solid #ddd; }
p.lead { font-size: 17px; color: #333; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 14px; font-size: 14.5px; }
th, td { border: 1px solid #ccc; padding: 5px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.provenance th { width: 170px; } table.provenance td { word-break: break-all; }
tr.holds td:nth-child(2) { background: #c8ecc9; color: #0b4d12; }
tr.fails td:nth-child(2) { background: #f6c6c6; color: #7a0c0c; }
tr.unknown td:nth-child(2) { background: #e6e6e6; color: #444; }
tr.untestable td:nth-child(2) { background: #fff1c2; color: #5c4400; }
figure { margin: 18px 0 30px; } figure img { width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 15px; color: #333; margin-top: 6px; }
.note { color: #555; font-size: 14px; }
"""


def scope_examples(aggregates: xr.Dataset, scope: str) -> int:
    """The most examples measured at any target of `scope` (0 when the scope was not run)."""
    scoped = np.asarray(aggregates["target_scope"].values) == scope
    measured = np.asarray(aggregates["examples_measured"].values)[:, scoped]
    return int(np.nanmax(measured)) if measured.size else 0


def _figure_html(file_name: str, caption: str) -> str:
    return (
        f'<figure><a href="{_escape(file_name)}"><img src="{_escape(file_name)}" alt="{_escape(caption[:120])}">'
        f"</a><figcaption>{caption}</figcaption></figure>"
    )


def _example_title(example: ExampleView) -> str:
    ratios = ", ".join(f"{variant} {ratio:.2f}" for variant, ratio in example.null_norm_ratio.items())
    return (
        f"Example {example.index} ({len(example.labels)} tokens, label {example.label}), layer {example.layer}, "
        f"head {example.head};  ‖A − E‖/‖A‖: {ratios}"
    )


def _guarantees(variants: Sequence[str]) -> str:
    """What the rows of each registered variant among `variants` are, as one sentence (from their records)."""
    phrases = [variant_record(name).guarantees for name in variants if name in VARIANTS]
    sentence = "; ".join(phrases)
    return sentence[:1].upper() + sentence[1:] + "." if sentence else ""


def write_report(inputs: ReportInputs, out: str | Path) -> Path:
    """Draw every figure into `out` (a local folder, created if needed) and write `out/index.html`; returns its
    path. Figures that have no data (no head-scope targets, no minimality probe) are left out and the page says
    so."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    attributes = inputs.attributes
    corpus = attributes.get("corpus", {})
    sections: list[str] = []

    # attention vs efficient vs null
    parts = []
    for example in inputs.examples:
        name = f"attention-example-{example.index}.png"
        figure = figures.attention_comparison_figure(
            example.attention,
            example.efficient,
            example.labels,
            title=_example_title(example),
        )
        figures.save_figure(figure, out / name)
        text = example.text if len(example.text) <= 500 else example.text[:500] + " …"
        parts.append(
            _figure_html(
                name,
                (
                    f"<b>Example {example.index}</b> ({len(example.labels)} tokens, label {_escape(example.label)}): "
                    f"“{_escape(text)}” — layer {example.layer}, head {example.head}, chosen as the head of this "
                    "example "
                    "whose null part is largest. One row per variant: the model's attention A, the efficient attention "
                    "E, "
                    "and the null part A − E that the variant removes; rows of each matrix are queries, columns keys. "
                    "Red is "
                    "positive, blue negative, white zero; all panels share one colour scale, linear up to the uniform "
                    "weight 1/L and logarithmic beyond. A and E give the head exactly the same output (E·T = A·T), so "
                    f"whatever differs between them is invisible to the model. {_guarantees(example.efficient)}"
                ),
            )
        )
    tokenizer_note = (
        ""
        if inputs.tokenizer_loaded
        else (
            '<p class="note">The tokenizer recorded in the store could not be loaded from local files: the axes show '
            "token ids.</p>"
        )
    )
    sections.append(
        "<h2>Attention, efficient attention and the null part</h2>"
        + tokenizer_note
        + ("".join(parts) if parts else '<p class="note">No example to draw.</p>')
    )

    # null-norm ratio vs length
    ratios = {variant: values["null_norm_ratio"] for variant, values in inputs.diagnostics.items()}
    if ratios:
        figures.save_figure(
            figures.null_norm_ratio_figure(inputs.length, ratios, inputs.head_dim), out / "null-norm-ratio.png"
        )
        heading = "<h2>How much attention lies in the null space</h2>"
        sections.append(
            heading
            + _figure_html(
                "null-norm-ratio.png",
                (
                    "The null-norm ratio ‖A − E‖<sub>F</sub> / ‖A‖<sub>F</sub> of every (example, layer, head) "
                    "against the example's length L: the line is the median of each length, the band the 10th–90th "
                    f"percentile. Left of the dashed line (L ≤ head dim d = {inputs.head_dim}) the value matrix T has "
                    "full row rank, its left null space is empty and E = A. Right of it, the larger the ratio, the "
                    "more "
                    "of the attention weights could be changed without changing the output."
                ),
            )
        )
        figures.save_figure(
            figures.diagnostic_distributions_figure(inputs.diagnostics, inputs.length), out / "diagnostics.png"
        )
        sections.append(
            "<h2>Are efficient attention matrices probability distributions?</h2>"
            + _figure_html(
                "diagnostics.png",
                (
                    "Distributions, over every (example, layer, head) whose null space is not empty, of the "
                    "row-sum error (largest |Σ<sub>j</sub> E[i, j] − 1| over the rows; left) and of the "
                    "negative mass (Σ of |negative entries| of E, divided by L; right), per variant, on log "
                    "scales. Values near 1e-7 and below are float rounding: a matrix there is a probability "
                    "distribution. The leftmost bin collects values ≤ 1e-16, exact zeros included."
                ),
            )
        )
        summary = attributes.get("efficient_diagnostics")
        if summary:
            sections.append(
                "<p>The same, summarised per variant (from the results' "
                "<code>efficient_diagnostics</code>):</p>" + diagnostics_html(summary)
            )

    # causal: per head, per layer, minimality
    head_figure = figures.head_scope_figure(inputs.aggregates, inputs.layers, inputs.heads)
    if head_figure is not None:
        figures.save_figure(head_figure, out / "head-scope.png")
        head_examples = scope_examples(inputs.aggregates, "head")
        sections.append(
            "<h2>One head at a time</h2>"
            + _figure_html(
                "head-scope.png",
                (
                    "Each intervention replaced the attention of a single head (all other heads untouched), one head "
                    "at a "
                    "time. Cells: the share of examples whose prediction is kept (agreement, green) or changed (flip "
                    "rate, "
                    "red), in %, for that layer (row) and head (column), over the "
                    f"{head_examples} examples measured at this scope (one example is "
                    f"{100 / max(head_examples, 1):.1f} %); "
                    "grey cells were not measured. Each metric has one colour scale for all its panels. For "
                    "classification "
                    "agreement + flip rate = 100 %."
                ),
            )
        )
    else:
        sections.append(
            '<h2>One head at a time</h2><p class="note">These results have no head-scope targets '
            "(run <code>effattn causal</code> with the scope <code>head</code>).</p>"
        )
    layer_figure = figures.layer_scope_figure(inputs.aggregates, inputs.layers)
    if layer_figure is not None:
        figures.save_figure(layer_figure, out / "layer-scope.png")
        sections.append(
            "<h2>One layer at a time</h2>"
            + _figure_html(
                "layer-scope.png",
                (
                    "Each row is an intervention that replaced every head of one layer (column) at once; cells give "
                    "the flip "
                    f"rate in %: the share of the {scope_examples(inputs.aggregates, 'layer')} examples measured at "
                    "this "
                    "scope whose prediction changed. Grey: not measured."
                ),
            )
        )
    minimality = figures.minimality_figure(inputs.aggregates, inputs.head_dim)
    if minimality is not None:
        figures.save_figure(minimality, out / "minimality.png")
        sections.append(
            "<h2>Minimality</h2>"
            + _figure_html(
                "minimality.png",
                (
                    "Every head of every layer receives A projected on col(T) with its k weakest directions (smallest "
                    "singular values) removed; k = 0 is the effective attention itself. If efficient attention is "
                    "minimal, "
                    "removing even one direction should lose predictions: agreement should drop below the dashed "
                    "sufficiency bar at k = 1."
                ),
            )
        )

    claims = attributes.get("claims") or []
    if inputs.explanations is not None:  # the explanation stage's section and claims rows
        from analysis.explanation_figures import explanation_section_html

        sections.append(explanation_section_html(inputs.explanations, out))
        claims = [*claims, *inputs.explanations.attrs.get("claims", [])]
    claims_section = (
        claims_html(claims)
        if claims
        else '<p class="note">The results hold no claims table yet: the causal run did not finish.</p>'
    )
    model = attributes.get("model", {})
    model_name = (model.get("head") or {}).get("base_model") or model.get("name", "?")
    title = f"effattn report: {corpus.get('name', '?')} × {model_name}"
    has_all = "all" in [str(target) for target in inputs.aggregates["target"].values]
    all_section = (
        aggregates_html(inputs.aggregates) if has_all else '<p class="note">No target "all" in these results.</p>'
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><main>
<h1>{_escape(title)}</h1>
<p class="lead">Does efficient attention — the attention matrix with its null-space part removed — carry the model's
prediction? Efficient attention E of each variant was put back into the model in place of the real attention A
(sufficiency), its complement A − E alone (necessity), and controls; the claims below are decided by the rules in
their last column. Click a figure to open it at full size.</p>
<h2>Provenance</h2>
{provenance_html(provenance_rows(inputs))}
<h2>Claims</h2>
{claims_section}
<h2>Every head of every layer replaced (target “all”)</h2>
{all_section}
{"".join(sections)}
</main></body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _difference(item: Mapping[str, Any]) -> str:
    if item.get("mean") is None or item.get("low") is None:
        return "—"
    return f"{item['mean']:+.4f} [{item['low']:+.4f}, {item['high']:+.4f}]"


def comparisons_html(studies: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The answer in one table: per study, variant and aggregation, does efficient attention explain the prediction
    more faithfully than raw attention, and than norm-based attention? The paired AOPC comprehensiveness
    differences with their 95 % intervals, as each study's explanation stage wrote them (its results' attribute
    `comparisons`, analysis.explanation_claims.faithfulness_comparisons); nothing is recomputed here."""
    rows, classes = [], []
    for study, comparisons in studies.items():
        by_key: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
        for item in comparisons:
            by_key.setdefault((item["variant"], item["aggregation"]), {})[item["baseline"]] = item
        for (variant, aggregation), found in by_key.items():
            cells = [_escape(study), _escape(variant), _escape(aggregation)]
            for baseline in ("raw attention", "norm-based attention"):
                item = found.get(baseline)
                cells.append(
                    "not measured"
                    if item is None
                    else f"<b>{_escape(item['answer'])}</b><br>{_escape(_difference(item))}, n = {item['n']}"
                )
            rows.append(cells)
            answer = (found.get("raw attention") or {}).get("answer", "")
            classes.append({"more faithful": "holds", "less faithful": "fails"}.get(answer, verdict_class(answer)))
    if not rows:
        return '<p class="note">No study explained its predictions (explain_examples 0).</p>'
    return _table(
        [
            "study",
            "variant",
            "aggregation",
            "than raw attention (Δ AOPC [95 % CI])",
            "than norm-based attention (Δ AOPC [95 % CI])",
        ],
        rows,
        classes,
    )


def write_studies_page(
    out: str | Path, rows: Sequence[Mapping[str, Any]], studies: Mapping[str, Mapping[str, Any]]
) -> Path:
    """`out/index.html`: the explanation question answered per study (`comparisons_html`, from each study's
    explanation results), then the claims of SEED.md (rows, from analysis.claims.claims_by_study) against every
    study (columns: verdict and the numbers behind it), with a link to each study's own report.

    studies: {study name: {"description", "report" (path of its index.html), "examples", "comparisons"
    (optional: the explanation results' `comparisons`)}}. Returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    answers = comparisons_html({name: info.get("comparisons") or [] for name, info in studies.items()})
    names = list(studies)
    headers = ["claim"] + [_escape(name) for name in names]
    body = []
    for row in rows:
        cells = [f"<td>{_escape(row['claim'])}</td>"]
        for name in names:
            entry = row.get(name)
            if entry is None:
                cells.append('<td class="unknown">not measured</td>')
                continue
            css = verdict_class(entry["verdict"])
            cells.append(
                f'<td class="{css}"><b>{_escape(entry["verdict"])}</b><br>'
                f'<span class="note">{_escape(entry["measured"])}</span></td>'
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{cell}</th>" for cell in headers)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    links = "".join(
        f'<li><a href="{_escape(os.path.relpath(info["report"], out))}">{_escape(name)}</a>: '
        f"{_escape(info['description'])}, {_escape(info['examples'])} examples</li>"
        for name, info in studies.items()
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>effattn: the claims over the study datasets</title>
<style>{STYLE}
td.holds {{ background: #e3f5e4; }} td.fails {{ background: #fbe3e3; }} td.unknown {{ background: #f0f0f0; }}
td.untestable {{ background: #fff6d6; }}
</style></head>
<body><main>
<h1>The claims of SEED.md over the study datasets</h1>
<h2>Does efficient attention explain the prediction more faithfully?</h2>
<p class="lead">Paired over the examples where efficient attention differs from raw attention (a block with a null
space: on shorter texts E = A and there is nothing to compare), the difference of ERASER AOPC comprehensiveness
(higher is more faithful), efficient minus raw, with its 95 % bootstrap interval: "more faithful" when the interval
lies above 0, "less faithful" below, "not testable" with fewer than 20 such examples.</p>
{answers}
<h2>The claims of SEED.md</h2>
<p class="lead">Each column is one study: its attention store, efficient attention and causal tests made by
<code>effattn studies</code>. A verdict follows the rule written in the study's own report (claims table,
last column); the numbers behind it are under each verdict. Interventions replace every head of every layer at
once.</p>
{table}
<h2>The studies</h2>
<ul>{links}</ul>
</main></body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
