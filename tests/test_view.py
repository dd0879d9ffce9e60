"""`effattn view` (flows/view.py): the real command serving a real store on loopback, driven by a headless Chromium
(Debian's `chromium`, through Playwright's Python client; never `playwright install`), and by a plain HTTP client
for the endpoints' errors; the command's refusals before any server starts.

With EFFATTN_VIEW_SCREENSHOT=1 the browser test also writes its screenshot of the example view to docs/view.png (the
picture in docs/VIEW.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from analysis.report_figures import load_local_tokenizer, token_labels
from analysis.view_html import decode_matrix
from storage_schemas.attention_store import open_attention_store
from storage_schemas.efficient_store import diagnostic_array_path, efficient_array_path
from tests.store_builders import (
    build_causal_results,
    build_explanation_results,
    build_real_store,
    build_text_store,
    write_corpus,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EFFATTN = str(Path(sys.executable).with_name("effattn"))
DOCS = Path(__file__).resolve().parents[1] / "docs"
EXPLAINED = [2, 7]  # store indices (stored by length): 7 is the review about grief


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_bert_folder) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("view")
    store = build_real_store(str(folder / "store.zarr"), tiny_bert_folder, write_corpus(folder / "reviews.csv"))
    flipped = np.array([[i % 2 for i in range(10)], [i >= 5 for i in range(10)]])
    results = build_causal_results(
        str(folder / "results.zarr"),
        store,
        [("null:simplex", "null", "simplex"), ("uniform", "uniform", "")],
        flipped,
        claims=[
            {
                "claim": "efficient attention is sufficient",
                "verdict": "holds",
                "measured": "100 %",
                "test": "agreement >= 95 %",
            }
        ],
    )
    length = open_attention_store(store)["length"][:]
    positions = open_attention_store(store)["tokens"].shape[1]
    rng = np.random.default_rng(0)
    attributions = {name: rng.normal(size=(len(EXPLAINED), positions)) for name in ("attention:last-layer", "random")}
    for values in attributions.values():
        for row, example in enumerate(EXPLAINED):
            values[row, length[example] :] = np.nan
    explanations = build_explanation_results(str(folder / "explanations.zarr"), store, EXPLAINED, attributions)
    return {
        "store": store,
        "results": results,
        "explanations": explanations,
        "folder": str(folder),
        "attributions": attributions,
    }


@pytest.fixture(scope="module")
def server(stores):
    """`effattn view STORE --results R --explanations X` on a free loopback port; stopped with SIGINT by its pid."""
    port = free_port()
    process = subprocess.Popen(
        [
            EFFATTN,
            "view",
            stores["store"],
            "--results",
            stores["results"],
            "--explanations",
            stores["explanations"],
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        pytest.fail(f"effattn view did not start: {process.stderr.read()}")
    url = f"http://127.0.0.1:{port}/"
    assert line.strip() == f"serving {stores['store']} at {url} (Ctrl-C stops)"
    yield {"url": url, "process": process}
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def matrix_on_page(page, kind: str, variant: str = "") -> np.ndarray:
    svg = page.locator(f'svg.heatmap[data-kind="{kind}"]' + (f'[data-variant="{variant}"]' if variant else ""))
    rows, cols = int(svg.get_attribute("data-rows")), int(svg.get_attribute("data-cols"))
    return decode_matrix(svg.get_attribute("data-matrix"), rows, cols)


def test_browse_overview_head_example_variant_and_layer(server, stores, tmp_path):
    from playwright.sync_api import sync_playwright

    group = open_attention_store(stores["store"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server["url"])
            assert stores["store"] in page.locator("#provenance").inner_text()
            assert "efficient attention is sufficient" in page.locator("#claims").inner_text()
            for variant in ("effective", "stochastic", "simplex"):
                cells = page.locator(f'section[data-variant="{variant}"] td.cell')
                assert cells.count() == 2 * 4
                shown = np.array([float(cells.nth(i).get_attribute("data-value")) for i in range(8)]).reshape(2, 4)
                np.testing.assert_allclose(
                    shown, group[diagnostic_array_path(variant, "null_norm_ratio")][:].mean(axis=0)
                )

            # follow a head of the grid: the example view at that layer and head
            page.locator('section[data-variant="effective"] td[data-layer="1"][data-head="2"] a').click()
            page.wait_for_url("**/example/*layer=1*head=2*")
            index = int(page.url.split("/example/")[1].split("?")[0])
            n = int(group["length"][index])
            attention = group["attention"][index, 1, 2, :n, :n]
            np.testing.assert_array_equal(matrix_on_page(page, "attention"), attention)
            for variant in ("effective", "stochastic", "simplex"):
                np.testing.assert_array_equal(
                    matrix_on_page(page, "efficient", variant),
                    group[efficient_array_path(variant)][index, 1, 2, :n, :n],
                )
            np.testing.assert_allclose(
                matrix_on_page(page, "difference", "effective"),
                attention - group[efficient_array_path("effective")][index, 1, 2, :n, :n],
                atol=1e-7,
            )

            # switch the variant of A - E
            page.locator("#variant-stochastic").click()
            page.wait_for_url("**variant=stochastic*")
            np.testing.assert_allclose(
                matrix_on_page(page, "difference", "stochastic"),
                attention - group[efficient_array_path("stochastic")][index, 1, 2, :n, :n],
                atol=1e-7,
            )

            # the keyboard steps layers and heads
            page.keyboard.press("ArrowUp")
            page.wait_for_url("**layer=0*")
            np.testing.assert_array_equal(matrix_on_page(page, "attention"), group["attention"][index, 0, 2, :n, :n])
            page.keyboard.press("ArrowRight")
            page.wait_for_url("**head=3*")
            attention = group["attention"][index, 0, 3, :n, :n]
            np.testing.assert_array_equal(matrix_on_page(page, "attention"), attention)
            assert "variant=stochastic" in page.url

            # hovering shows the query token, the key token and the value
            svg = page.locator('svg.heatmap[data-kind="attention"]')
            box = svg.bounding_box()
            cell, margin = float(svg.get_attribute("data-cell")), float(svg.get_attribute("data-margin"))
            i, j = 3, 5
            page.mouse.move(box["x"] + margin + (j + 0.5) * cell, box["y"] + margin + (i + 0.5) * cell)
            tooltip = page.locator("#tooltip")
            tokens = json.loads(page.locator("#tokens").text_content())
            tokenizer = load_local_tokenizer(group.attrs["tokenizer"]["name_or_path"])
            assert tokens == token_labels(group["tokens"][index, :n], tokenizer) and "[CLS]" in tokens
            assert tooltip.is_visible()
            assert (int(tooltip.get_attribute("data-query")), int(tooltip.get_attribute("data-key"))) == (i, j)
            assert float(tooltip.get_attribute("data-value")) == pytest.approx(float(attention[i, j]), rel=1e-6)
            assert (
                f"query {tokens[i]} ({i})" in tooltip.inner_text() and f"key {tokens[j]} ({j})" in tooltip.inner_text()
            )

            # the example table: sort by length (descending), then open an explained example
            page.goto(server["url"] + "examples")
            assert page.locator("#examples tr").count() == 11  # header + 10 examples
            page.locator('a.sort[data-column="length"]').click()
            page.wait_for_url("**sort=length*")
            page.locator('a.sort[data-column="length"]').click()
            page.wait_for_url("**order=desc*")
            shown = [int(page.locator("#examples tr").nth(r).locator("td").nth(2).inner_text()) for r in range(1, 11)]
            assert shown == sorted(group["length"][:].tolist(), reverse=True)
            page.goto(server["url"] + "examples?search=grief")
            page.locator("a.example").first.click()
            page.wait_for_url("**/example/*")
            index = int(page.url.split("/example/")[1].split("?")[0])
            assert index in EXPLAINED and "grief" in page.locator("#text").inner_text()
            n = int(group["length"][index])
            row = EXPLAINED.index(index)
            for name, values in stores["attributions"].items():
                spans = page.locator(f'.explainer[data-explainer="{name}"] span.token')
                assert spans.count() == n
                np.testing.assert_allclose(
                    [float(spans.nth(k).get_attribute("data-value")) for k in range(n)],
                    values[row, :n].astype(np.float32),
                    rtol=1e-6,
                )
            np.testing.assert_array_equal(matrix_on_page(page, "attention"), group["attention"][index, 0, 0, :n, :n])
            page.keyboard.press("]")
            page.wait_for_url(f"**/example/{index + 1}*")

            page.goto(server["url"] + f"example/{index}?layer=1&head=2&variant=simplex")
            screenshot = tmp_path / "view.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            if os.environ.get("EFFATTN_VIEW_SCREENSHOT"):
                shutil.copy(screenshot, DOCS / "view.png")
        finally:
            browser.close()


def test_endpoint_errors_are_one_line_json(server):
    def get(path: str) -> httpx.Response:
        return httpx.get(server["url"].rstrip("/") + path, timeout=30)

    for path, status, message in [
        ("/example/10", 404, "example 10 does not exist: the store has examples 0..9"),
        ("/example/3?layer=2", 404, "layer 2 is not in the store: it holds layers [0, 1]"),
        ("/example/3?head=-1", 404, "head -1 is not in the store"),
        ("/example/3?variant=nope", 404, "variant 'nope' is not computed for example 3"),
        ("/example/abc", 400, "example must be an integer, got 'abc'"),
        ("/example/3?layer=1.5", 400, "layer must be an integer, got '1.5'"),
        ("/examples?offset=-1", 400, "offset must be 0 or more"),
        ("/examples?order=up", 400, "order must be asc or desc"),
        ("/examples?correct=perhaps", 400, "correct must be yes or no"),
        ("/examples?sort=..%2F..%2Fetc%2Fpasswd", 400, "cannot sort by '../../etc/passwd'"),
        ("/example/..%2F..%2Fetc%2Fpasswd", 404, "no page at /example/../../etc/passwd"),
        ("/example/%2e%2e", 400, "example must be an integer, got '..'"),
        ("/../../etc/passwd", 404, "no page at /etc/passwd"),
        ("/store.zarr/zarr.json", 404, "no page at /store.zarr/zarr.json"),
    ]:
        response = get(path)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert "\n" not in response.text and "root:" not in response.text
        assert message in response.json()["error"], (path, response.json())
    found = get("/examples?search=..%2F..%2Fetc%2Fpasswd")
    assert found.status_code == 200 and "examples none" in found.text  # a search is a search, not a path
    assert float(get("/example/3").headers["server-timing"].split("dur=")[1]) > 0


def run_view(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([EFFATTN, "view", *arguments], capture_output=True, text=True, timeout=60)


def test_refusals_before_any_server_starts(stores, tmp_path):
    missing = run_view(str(tmp_path / "nothing.zarr"))
    other = build_text_store(str(tmp_path / "other.zarr"), [f"t {i}" for i in range(10)], [0] * 10, shard_size=4)
    another = run_view(other, "--results", stores["results"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run_view(stores["store"], "--port", str(busy.getsockname()[1]))
    for completed, message in [
        (missing, f"there is no attention store at {tmp_path / 'nothing.zarr'}: create one with `effattn extract"),
        (another, f"{stores['results']} were not computed from the attention store {other}"),
        (taken, "another program uses the port; choose another with --port"),
    ]:
        assert completed.returncode == 2, completed
        assert completed.stdout == ""
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("effattn view: error: ") and message in lines[0], lines


def test_ctrl_c_stops_with_one_line_and_status_130(stores):
    port = free_port()
    process = subprocess.Popen(
        [EFFATTN, "view", stores["store"], "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("serving ")
    assert httpx.get(f"http://127.0.0.1:{port}/examples", timeout=30).status_code == 200
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.strip() == "effattn view: interrupted by SIGINT: run the same command again to start over"
    assert time.monotonic() - started < 15  # flows.interrupts.SHUTDOWN_SECONDS would end it otherwise


def test_other_hosts_are_warned_about_and_run_and_report_print_the_command():
    from flows.view import host_warning, view_command

    assert host_warning("127.0.0.1") is None and host_warning("::1") is None and host_warning("localhost") is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        assert host_warning(host) == (
            f"warning: serving on {host}: the store (texts, attention, results) becomes "
            "readable by anyone who can reach this port; use --host 127.0.0.1 to keep it "
            "local"
        )
    assert view_command("runs/a b.zarr", "runs/r.zarr", None) == "effattn view 'runs/a b.zarr' --results runs/r.zarr"
    assert view_command("s3://bucket/s.zarr", None, "x.zarr") == "effattn view s3://bucket/s.zarr --explanations x.zarr"


def test_report_prints_the_view_command(stores, monkeypatch, capsys):
    import flows.report
    from flows.cli import _run_report
    from flows.settings import ReportSettings

    monkeypatch.setattr(flows.report, "report", lambda settings: "out/index.html")
    assert _run_report(ReportSettings(results=stores["results"], out="out")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "report: out/index.html",
        f"browse it: effattn view {stores['store']} --results {stores['results']}",
    ]
