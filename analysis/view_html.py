"""The pages of `effattn view`, rendered on the server as HTML with inline SVG: colour scales, heatmaps, the overview's
layer x head grids, the example table and the example view. Plain functions of arrays and strings (the web app in
flows/view.py calls them with what storage_schemas/store_view.py reads).

A heatmap is an `<svg class="heatmap">` holding its colours as one PNG image (one pixel per cell, drawn without
smoothing) and its numbers in the attribute `data-matrix`: the [rows, cols] values as little-endian float32, base64.
One element per cell would be 262,144 elements per matrix at 512 tokens (seven matrices per example view); the PNG
keeps a page small, and the page's script reads `data-matrix` to show the value under the pointer (as tests do to
read the matrix back). A, E and A - E are drawn on a diverging scale centred at 0 (E has negative entries), A and
every E with one shared range so that the same colour is the same value in each; A - E has its own range. The
overview's grid of ||A - E||/||A|| (never negative) uses a sequential scale from 0.

The page's only script is `VIEW_SCRIPT` below (hover and keyboard), hand-written: no third-party JavaScript.
"""

from __future__ import annotations

import base64
import html
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import numpy as np

# Colour anchors, interpolated linearly: sequential white -> dark blue; diverging blue (negative) -> white (0) -> red.
SEQUENTIAL = np.array([[255, 255, 255], [158, 202, 225], [33, 113, 181], [8, 48, 107]], dtype=np.float64)
DIVERGING = np.array(
    [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], dtype=np.float64
)
MISSING = np.array([200, 200, 200], dtype=np.uint8)  # NaN: not computed, not removable
HEATMAP_PIXELS = 420  # a heatmap's drawn side, whatever its size
LABELS_SHOWN = 64  # at most this many token labels per axis (every k-th beyond)


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


# --- colours ------------------------------------------------------------------------------------------------------
LEVELS = 256  # colour steps of a scale (an odd number of entries: 0 of a diverging scale is its exact middle)


def _interpolate(anchors: np.ndarray, position: np.ndarray) -> np.ndarray:
    """RGB uint8 [n, 3] at `position` [n] in 0..1 along `anchors` (linear between neighbouring anchors)."""
    position = position * (len(anchors) - 1)
    low = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    weight = (position - low)[..., None]
    return np.rint(anchors[low] * (1 - weight) + anchors[low + 1] * weight).astype(np.uint8)


LOOKUP = {
    name: _interpolate(anchors, np.linspace(0, 1, LEVELS + 1))
    for name, anchors in (("sequential", SEQUENTIAL), ("diverging", DIVERGING))
}


def colours(values: np.ndarray, scale: str, vmax: float) -> np.ndarray:
    """RGB uint8 [..., 3] of `values` [...]: `scale` "sequential" maps [0, vmax] to white..blue (clipped),
    "diverging" maps [-vmax, vmax] to blue..white..red with white exactly at 0; NaN is grey. In LEVELS steps (a
    lookup table: a 512 x 512 matrix takes milliseconds)."""
    values = np.asarray(values, dtype=np.float32)
    vmax = float(vmax) if vmax > 0 else 1.0
    position = values / vmax if scale == "sequential" else (values / vmax + 1) / 2  # 0..1
    steps = np.rint(np.clip(np.nan_to_num(position, nan=0.0), 0, 1) * LEVELS).astype(np.intp)
    rgb = LOOKUP[scale][steps]
    rgb[np.isnan(values)] = MISSING
    return rgb


def css_colour(rgb: Sequence[int]) -> str:
    return f"rgb({int(rgb[0])},{int(rgb[1])},{int(rgb[2])})"


def png_bytes(rgb: np.ndarray) -> bytes:
    """A PNG file of the image rgb [height, width, 3] uint8 (8-bit RGB, no filter)."""
    height, width, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def encode_matrix(matrix: np.ndarray) -> str:
    """[rows, cols] -> base64 of its little-endian float32 values (what `data-matrix` holds; `decode_matrix`)."""
    return base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes()).decode("ascii")


def decode_matrix(text: str, rows: int, cols: int) -> np.ndarray:
    """`encode_matrix`'s inverse: [rows, cols] float32."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(rows, cols)


def symmetric_range(*matrices: np.ndarray) -> float:
    """The largest |value| of the matrices (1 when all are zero or empty): the half-range of a scale centred at 0."""
    largest = max(
        (float(np.nanmax(np.abs(m))) for m in matrices if np.size(m) and not np.all(np.isnan(m))), default=0.0
    )
    return largest if largest > 0 else 1.0


# --- heatmaps -----------------------------------------------------------------------------------------------------
def heatmap_svg(
    matrix: np.ndarray, tokens: Sequence[str], title: str, kind: str, scale: str, vmax: float, variant: str = ""
) -> str:
    """One heatmap figure of matrix [query, key] with the query tokens down the left and the key tokens along the
    top; `kind` (attention, efficient, difference) and `variant` are written as data attributes for the script and
    tests, with the matrix itself (`data-matrix`)."""
    rows, cols = matrix.shape
    cell = max(1, HEATMAP_PIXELS // max(rows, cols, 1))
    margin = 96
    step = max(1, -(-max(rows, 1) // LABELS_SHOWN))
    font = max(6, min(12, cell - 1)) if step == 1 else 8
    image = base64.b64encode(png_bytes(colours(matrix, scale, vmax))).decode("ascii")
    width, height = margin + cols * cell + 8, margin + rows * cell + 8
    labels = []
    for i in range(0, rows, step):
        labels.append(
            f'<text x="{margin - 4}" y="{margin + (i + 0.5) * cell}" text-anchor="end" '
            f'dominant-baseline="middle" font-size="{font}">{_escape(tokens[i])}</text>'
        )
    for j in range(0, cols, step):
        x = margin + (j + 0.5) * cell
        labels.append(
            f'<text x="{x}" y="{margin - 4}" font-size="{font}" '
            f'transform="rotate(-60 {x} {margin - 4})">{_escape(tokens[j])}</text>'
        )
    svg = (
        f'<svg class="heatmap" width="{width}" height="{height}" data-kind="{_escape(kind)}" '
        f'data-variant="{_escape(variant)}" data-rows="{rows}" data-cols="{cols}" data-cell="{cell}" '
        f'data-margin="{margin}" data-scale="{scale}" data-vmax="{vmax!r}" data-matrix="{encode_matrix(matrix)}">'
        f'<image x="{margin}" y="{margin}" width="{cols * cell}" height="{rows * cell}" '
        f'preserveAspectRatio="none" style="image-rendering:pixelated" href="data:image/png;base64,{image}"/>'
        f"{''.join(labels)}</svg>"
    )
    return f'<figure class="map"><figcaption>{_escape(title)}</figcaption>{svg}{legend_html(scale, vmax)}</figure>'


def legend_html(scale: str, vmax: float) -> str:
    """A colour bar from the scale's low end to its high end, with both ends written."""
    low = 0.0 if scale == "sequential" else -vmax
    stops = np.linspace(low, vmax, 9)
    gradient = ", ".join(css_colour(rgb) for rgb in colours(stops, scale, vmax))
    return (
        f'<div class="legend"><span>{low:.3g}</span><span class="bar" style="background: linear-gradient(to '
        f'right, {gradient})"></span><span>{vmax:.3g}</span>'
        f"{'<span>(white: 0)</span>' if scale == 'diverging' else ''}</div>"
    )


def attribution_html(attributions: Mapping[str, np.ndarray], tokens: Sequence[str]) -> str:
    """Each explainer's attribution [tokens] as coloured text (diverging, centred at 0, scaled per explainer by its
    largest |value|; grey: not removable), side by side."""
    if not attributions:
        return ""
    cards = []
    for name, values in attributions.items():
        vmax = symmetric_range(np.asarray(values))
        spans = "".join(
            f'<span class="token" style="background:{css_colour(rgb)}" data-value="{value!r}" '
            f'title="{_escape(token)}: {value:.4g}">{_escape(token)}</span> '
            for token, value, rgb in zip(tokens, values.tolist(), colours(values, "diverging", vmax))
        )
        cards.append(
            f'<div class="explainer" data-explainer="{_escape(name)}"><h4>{_escape(name)}</h4><p>{spans}</p></div>'
        )
    return (
        f'<section id="attributions"><h3>Token attributions</h3><div class="explainers">{"".join(cards)}</div>'
        "</section>"
    )


# --- pages ----------------------------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; font-size: 13px; }
table.grid td { width: 22px; height: 22px; padding: 0; text-align: center; }
table.grid td a { display: block; width: 100%; height: 100%; }
.maps { display: flex; flex-wrap: wrap; gap: 1em; }
figure.map { margin: 0; }
figcaption { font-weight: 600; }
.legend { display: flex; align-items: center; gap: 4px; font-size: 12px; }
.legend .bar { display: inline-block; width: 160px; height: 10px; }
#tooltip { position: fixed; background: #fff; border: 1px solid #888; padding: 2px 6px; font-size: 12px;
           pointer-events: none; display: none; }
.explainers { display: flex; flex-wrap: wrap; gap: 1em; }
.explainer { flex: 1 1 320px; border: 1px solid #ddd; padding: 0 0.5em; }
.token { padding: 0 2px; line-height: 1.8; }
.controls a, .controls span { margin-right: 0.6em; }
.current { font-weight: 700; }
tr.holds td { background: #eaf7ea; } tr.fails td { background: #fbeaea; }
"""

# Hover: the query token, key token and value under the pointer; keys: arrows step heads (left/right) and layers
# (up/down), [ and ] step examples; each key follows the link of the button with the same id.
VIEW_SCRIPT = """
(function () {
  const tokens = JSON.parse((document.getElementById('tokens') || {textContent: '[]'}).textContent);
  const tip = document.getElementById('tooltip');
  function matrixOf(svg) {
    if (!svg._matrix) {
      const bytes = Uint8Array.from(atob(svg.dataset.matrix), c => c.charCodeAt(0));
      svg._matrix = new Float32Array(bytes.buffer);
    }
    return svg._matrix;
  }
  document.querySelectorAll('svg.heatmap').forEach(function (svg) {
    svg.addEventListener('mousemove', function (event) {
      const box = svg.getBoundingClientRect();
      const cell = Number(svg.dataset.cell), margin = Number(svg.dataset.margin);
      const j = Math.floor((event.clientX - box.left - margin) / cell);
      const i = Math.floor((event.clientY - box.top - margin) / cell);
      const rows = Number(svg.dataset.rows), cols = Number(svg.dataset.cols);
      if (i < 0 || j < 0 || i >= rows || j >= cols) { tip.style.display = 'none'; return; }
      const value = matrixOf(svg)[i * cols + j];
      tip.textContent = 'query ' + tokens[i] + ' (' + i + ') \\u00b7 key ' + tokens[j] + ' (' + j + ') \\u00b7 ' +
        value.toPrecision(4);
      tip.dataset.query = i; tip.dataset.key = j; tip.dataset.value = value;
      tip.style.left = (event.clientX + 12) + 'px'; tip.style.top = (event.clientY + 12) + 'px';
      tip.style.display = 'block';
    });
    svg.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  });
  const keys = {ArrowLeft: 'prev-head', ArrowRight: 'next-head', ArrowUp: 'prev-layer', ArrowDown: 'next-layer',
                '[': 'prev-example', ']': 'next-example'};
  document.addEventListener('keydown', function (event) {
    if (event.target.tagName === 'INPUT' || event.target.tagName === 'SELECT') return;
    const link = document.getElementById(keys[event.key]);
    if (link && link.href) { event.preventDefault(); window.location.href = link.href; }
  });
})();
"""


def page(title: str, body: str, tokens: Sequence[str] = ()) -> str:
    """A whole page: the navigation, `body`, the tooltip and the script."""
    token_json = json.dumps(list(tokens)).replace("</", "<\\/")  # JSON inside <script>: no closing tag in it
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{_escape(title)}</title><style>{STYLE}</style></head><body>"
        '<nav><a href="/">overview</a><a href="/examples">examples</a></nav>'
        f"<h1>{_escape(title)}</h1>{body}<div id='tooltip'></div>"
        f"<script id='tokens' type='application/json'>{token_json}</script>"
        f"<script>{VIEW_SCRIPT}</script></body></html>"
    )


def link(path: str, **parameters: Any) -> str:
    """`path?a=1&b=2` with the parameters that are not None."""
    given = {key: value for key, value in parameters.items() if value is not None}
    return f"{path}?{urlencode(given)}" if given else path


def table_html(
    headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None, table_id: str = ""
) -> str:
    """A table whose cells are already HTML (escape them first)."""
    head = f"<tr>{''.join(f'<th>{cell}</th>' for cell in headers)}</tr>" if headers else ""
    body = "".join(
        f"<tr{f' class={chr(34)}{row_classes[i]}{chr(34)}' if row_classes else ''}>"
        + "".join(f"<td>{cell}</td>" for cell in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table{f' id={chr(34)}{table_id}{chr(34)}' if table_id else ''}>{head}{body}</table>"


def grid_html(
    variant: str,
    grid: np.ndarray,
    layers: Sequence[int],
    heads: Sequence[int],
    vmax: float,
    example: int | None,
    examples_in_mean: int,
) -> str:
    """The layer x head grid of one variant: mean ||A - E||/||A|| [layer, head] per cell, coloured on a sequential
    scale [0, vmax]; each cell links to that head's view of `example` (None: no example to link to)."""
    rows = []
    cells = colours(grid, "sequential", vmax)
    for li, layer in enumerate(layers):
        row = [f"<th>layer {layer}</th>"]
        for hi, head in enumerate(heads):
            value = float(grid[li, hi])
            text = f"layer {layer} head {head}: mean ||A-E||/||A|| = {value:.4g}"
            inner = (
                ""
                if example is None
                else f'<a href="{_escape(link(f"/example/{example}", layer=layer, head=head, variant=variant))}"></a>'
            )
            row.append(
                f'<td class="cell" style="background:{css_colour(cells[li, hi])}" data-layer="{layer}" '
                f'data-head="{head}" data-value="{value!r}" title="{_escape(text)}">{inner}</td>'
            )
        rows.append(f"<tr>{''.join(row)}</tr>")
    header = "<tr><th></th>" + "".join(f"<th>{head}</th>" for head in heads) + "</tr>"
    return (
        f'<section class="variant" data-variant="{_escape(variant)}"><h3>{_escape(variant)}</h3>'
        f"<p>mean ||A − E||/||A|| over {examples_in_mean} examples (columns: heads)</p>"
        f'<table class="grid">{header}{"".join(rows)}</table>{legend_html("sequential", vmax)}</section>'
    )


def overview_body(
    provenance: Sequence[tuple[str, str]],
    claims: Sequence[Mapping[str, Any]],
    grids: Mapping[str, tuple[np.ndarray, int]],
    layers: Sequence[int],
    heads: Sequence[int],
    example: int | None,
) -> str:
    """Provenance rows, the claims table (when results were given) and one grid per variant {variant: (grid
    [layer, head], examples in the mean)}."""
    parts = [
        "<h2>Provenance</h2>",
        table_html([], [[_escape(key), _escape(value)] for key, value in provenance], table_id="provenance"),
    ]
    if claims:
        rows = [
            [
                _escape(row.get("claim", "")),
                f"<b>{_escape(row.get('verdict', ''))}</b>",
                _escape(row.get("measured", "")),
                _escape(row.get("test", "")),
            ]
            for row in claims
        ]
        classes = [{"holds": "holds", "does not hold": "fails"}.get(row.get("verdict"), "unknown") for row in claims]
        parts += ["<h2>Claims</h2>", table_html(["claim", "verdict", "measured", "test"], rows, classes, "claims")]
    parts.append("<h2>Heads: how much of A efficient attention removes</h2>")
    if not grids:
        parts.append(
            "<p>No efficient attention is computed in this store yet (run <code>effattn efficient</code>).</p>"
        )
    vmax = symmetric_range(*(grid for grid, _ in grids.values()))
    for variant, (grid, count) in grids.items():
        parts.append(grid_html(variant, grid, layers, heads, vmax, example, count))
    return "".join(parts)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _escape(value)


def examples_body(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    query: Mapping[str, Any],
    total: int | None,
    more: bool,
    class_names: Sequence[str],
    outcomes: Sequence[str],
) -> str:
    """The example table: a filter form, sortable headers (a second click reverses), the page's rows and links to
    the previous and next pages. `query`: the request's parameters (offset, limit, sort, order, search, label,
    correct, outcome, outcome_value)."""

    def with_(**changes: Any) -> str:
        return link(
            "/examples", **{**{key: value for key, value in query.items() if value not in (None, "")}, **changes}
        )

    offset, limit = int(query.get("offset") or 0), int(query.get("limit") or 25)
    headers = []
    for column in ("index", "text", *columns[1:]):
        if column == "text":
            headers.append("text")
            continue
        descending = query.get("sort") == column and query.get("order") != "desc"
        arrow = ("▼" if query.get("order") == "desc" else "▲") if query.get("sort", "index") == column else ""
        headers.append(
            f'<a class="sort" data-column="{_escape(column)}" href="'
            f'{_escape(with_(sort=column, order="desc" if descending else "asc", offset=0))}">'
            f"{_escape(column)}</a>{arrow}"
        )
    body_rows = [
        [
            f'<a class="example" href="/example/{row["index"]}">{row["index"]}</a>',
            _escape(row["text"]),
            *(_cell(row[column]) for column in columns[1:]),
        ]
        for row in rows
    ]
    label_options = "".join(
        f'<option value="{i}"{" selected" if str(query.get("label")) == str(i) else ""}>{_escape(name)}</option>'
        for i, name in enumerate(class_names)
    )
    yes_no = lambda name: "".join(  # noqa: E731
        f'<option value="{value}"{" selected" if query.get(name) == value else ""}>{value or "any"}</option>'
        for value in ("", "yes", "no")
    )
    outcome_options = "".join(
        f"<option{' selected' if query.get('outcome') == name else ''}>{_escape(name)}</option>" for name in outcomes
    )
    form = (
        f'<form id="filters" method="get" action="/examples">'
        f'search <input name="search" value="{_escape(query.get("search") or "")}"> '
        f'label <select name="label"><option value="">any</option>{label_options}</select> '
        f'correct <select name="correct">{yes_no("correct")}</select> '
        + (
            f'<select name="outcome"><option value="">outcome…</option>{outcome_options}</select> '
            f'<select name="outcome_value">{yes_no("outcome_value")}</select> '
            if outcomes
            else ""
        )
        + f'<input type="hidden" name="sort" value="{_escape(query.get("sort") or "index")}">'
        f'<input type="hidden" name="order" value="{_escape(query.get("order") or "asc")}">'
        '<button type="submit">apply</button></form>'
    )
    shown = f"{offset + 1}–{offset + len(rows)}" if rows else "none"
    of = f" of {total}" if total is not None else ""
    pager = []
    if offset > 0:
        pager.append(f'<a id="prev-page" href="{_escape(with_(offset=max(0, offset - limit)))}">previous</a>')
    if more:
        pager.append(f'<a id="next-page" href="{_escape(with_(offset=offset + limit))}">next</a>')
    return (
        form
        + f'<p id="shown">examples {shown}{of}</p>'
        + table_html(headers, body_rows, table_id="examples")
        + f'<p class="controls">{" ".join(pager)}</p>'
    )


def _nav(identifier: str, text: str, href: str | None) -> str:
    return f'<a id="{identifier}" href="{_escape(href)}">{text}</a>' if href else f"<span>{text}</span>"


def example_body(example: Any, variant: str | None, navigation: Mapping[str, str | None]) -> str:
    """The example view of `example` (storage_schemas.store_view.ExampleData: tokens, text, label, prediction,
    attention [L, L], efficient {variant: [L, L]}, null_norm_ratio, attributions {explainer: [L]}): heatmaps of A,
    of each E and of A - E for `variant`; `navigation`: id -> link of the buttons (prev-/next- layer, head,
    example; variant-<name>)."""
    controls = " ".join(
        [
            _nav("prev-example", "◀ example", navigation.get("prev-example")),
            _nav("next-example", "example ▶", navigation.get("next-example")),
            _nav("prev-layer", "▲ layer", navigation.get("prev-layer")),
            f"<span class='current'>layer {example.layer}</span>",
            _nav("next-layer", "layer ▼", navigation.get("next-layer")),
            _nav("prev-head", "◀ head", navigation.get("prev-head")),
            f"<span class='current'>head {example.head}</span>",
            _nav("next-head", "head ▶", navigation.get("next-head")),
        ]
    )
    variants = " ".join(
        f'<a id="variant-{_escape(name)}" class="{"current" if name == variant else ""}" '
        f'href="{_escape(navigation.get("variant-" + name) or "")}">{_escape(name)}</a>'
        for name in example.efficient
    )
    info = (
        f"<p id='text'>{_escape(example.text)}</p><p>label <b>{_escape(example.label)}</b> · prediction "
        f"<b>{_escape(example.prediction)}</b> · {len(example.tokens)} tokens</p>"
    )
    vmax = symmetric_range(example.attention, *example.efficient.values())
    maps = [heatmap_svg(example.attention, example.tokens, "A (attention)", "attention", "diverging", vmax)]
    for name, matrix in example.efficient.items():
        ratio = example.null_norm_ratio.get(name, float("nan"))
        maps.append(
            heatmap_svg(
                matrix, example.tokens, f"E ({name}), ||A−E||/||A|| = {ratio:.3g}", "efficient", "diverging", vmax, name
            )
        )
    if variant is not None and variant in example.efficient:
        difference = example.attention - example.efficient[variant]
        maps.append(
            heatmap_svg(
                difference,
                example.tokens,
                f"A − E ({variant})",
                "difference",
                "diverging",
                symmetric_range(difference),
                variant,
            )
        )
    missing = "" if example.efficient else "<p>No efficient attention is computed for this example's shard yet.</p>"
    return (
        f'<p class="controls">{controls}</p><p class="controls">A − E of: {variants or "—"}</p>{info}{missing}'
        f'<div class="maps">{"".join(maps)}</div>{attribution_html(example.attributions, example.tokens)}'
        "<p><small>keys: ←/→ head, ↑/↓ layer, [ / ] example</small></p>"
    )
