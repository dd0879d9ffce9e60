"""analysis/view_html.py: colour scales, the heatmaps' PNG and data, and the pages' parts."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from analysis.view_html import (
    DIVERGING,
    SEQUENTIAL,
    attribution_html,
    colours,
    decode_matrix,
    encode_matrix,
    examples_body,
    grid_html,
    heatmap_svg,
    page,
    png_bytes,
    symmetric_range,
)


def test_diverging_scale_is_white_at_zero_and_symmetric():
    values = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 5.0, np.nan])
    rgb = colours(values, "diverging", 2.0)
    assert rgb[2].tolist() == DIVERGING[2].tolist()  # 0: the middle (white) anchor
    assert rgb[0].tolist() == DIVERGING[0].tolist() and rgb[4].tolist() == DIVERGING[-1].tolist()
    assert rgb[5].tolist() == DIVERGING[-1].tolist()  # clipped
    assert rgb[6].tolist() == [200, 200, 200]  # NaN
    # the same distance from 0 on either side sits the same distance from white
    assert np.abs(rgb[1].astype(int) - DIVERGING[2]).sum() > 0
    sequential = colours(np.array([0.0, 1.0, 0.5]), "sequential", 1.0)
    assert sequential[0].tolist() == SEQUENTIAL[0].tolist() and sequential[1].tolist() == SEQUENTIAL[-1].tolist()


def test_png_holds_one_pixel_per_cell_in_the_scale_colours():
    matrix = np.array([[0.0, 0.5, -0.25], [1.0, -1.0, 0.1]])
    rgb = colours(matrix, "diverging", 1.0)
    image = np.asarray(Image.open(io.BytesIO(png_bytes(rgb))).convert("RGB"))
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image, rgb)


def test_heatmap_carries_its_matrix_and_tokens():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(5, 5))
    svg = heatmap_svg(
        matrix, ["[CLS]", "a", "<b>", "c", "[SEP]"], "E (simplex)", "efficient", "diverging", 3.0, "simplex"
    )
    data = re.search(r'data-matrix="([^"]+)"', svg).group(1)
    np.testing.assert_array_equal(decode_matrix(data, 5, 5), matrix.astype(np.float32))
    assert 'data-variant="simplex"' in svg and 'data-kind="efficient"' in svg
    assert "&lt;b&gt;" in svg and "<b>" not in svg  # token labels are escaped
    assert svg.count("<text") == 10  # every token on both axes
    assert decode_matrix(encode_matrix(np.eye(2)), 2, 2).tolist() == [[1, 0], [0, 1]]
    assert symmetric_range(np.array([[-4.0, 1.0]]), np.array([[2.0]])) == 4.0
    assert symmetric_range(np.zeros((2, 2))) == 1.0


def test_long_examples_label_every_kth_token():
    svg = heatmap_svg(np.zeros((512, 512)), [f"t{i}" for i in range(512)], "A", "attention", "sequential", 1.0)
    assert svg.count("<text") == 2 * 64


def test_grid_cells_link_to_their_head_and_attributions_are_coloured_text():
    grid = np.array([[0.1, 0.2], [0.3, np.nan]])
    html = grid_html("simplex", grid, [2, 5], [0, 7], 0.3, 4, 10)
    links = re.findall(r'href="([^"]+)"', html)
    assert links == [
        "/example/4?layer=2&amp;head=0&amp;variant=simplex",
        "/example/4?layer=2&amp;head=7&amp;variant=simplex",
        "/example/4?layer=5&amp;head=0&amp;variant=simplex",
        "/example/4?layer=5&amp;head=7&amp;variant=simplex",
    ]
    assert re.findall(r'data-value="([^"]+)"', html) == ["0.1", "0.2", "0.3", "nan"]
    text = attribution_html({"attention": np.array([0.5, -0.5, np.nan])}, ["a", "b", "c"])
    assert re.findall(r'data-value="([^"]+)"', text) == ["0.5", "-0.5", "nan"]
    assert "background:rgb(178,24,43)" in text and "background:rgb(33,102,172)" in text
    assert attribution_html({}, ["a"]) == ""


def test_example_table_links_sort_and_pages():
    rows = [{"index": 3, "text": "a <i>b</i>", "length": 4, "label": "good", "prediction": "bad", "correct": False}]
    html = examples_body(
        rows,
        ["index", "length", "label", "prediction", "correct"],
        {"offset": 25, "limit": 25, "sort": "length", "order": "asc", "search": "b"},
        None,
        True,
        ["bad", "good"],
        [],
    )
    assert "a &lt;i&gt;b&lt;/i&gt;" in html
    assert 'href="/example/3"' in html
    assert "/examples?offset=0&amp;limit=25&amp;sort=length&amp;order=desc&amp;search=b" in html  # reverses
    assert 'id="next-page" href="/examples?offset=50' in html and 'id="prev-page" href="/examples?offset=0' in html
    whole = page("t", html, ["</script><b>"])
    assert "</script><b>" not in whole.split("<script id='tokens'")[1].split("</script>")[0]
