"""`effattn view`: the server-side time of an example view at 512 tokens, and what the heatmaps' form costs.

1. a local store with MiniLM's shapes (6 layers x 12 heads, head dim 32, hidden 384), --examples examples of 512
   tokens each (random attention rows, the worst case for the codec), and the three variants' E stored beside it;
2. the example view `/example/I?layer=&head=&variant=` served by the real app (flows/view.py, in process through
   Starlette's test client): the server-side time of each request (its `Server-Timing` header), split into
   reading (StoreView.example: one example's chunks) and rendering (analysis/view_html.py), and the page's bytes;
3. one array of one example: reading one (layer, head) block against reading its whole chunk (what keeping the
   decoded chunks of the example on view would cost);
4. the heatmap form: one PNG + `data-matrix` per matrix (what the pages use) against one SVG <rect> per cell with
   its value in a data attribute, for one 512 x 512 matrix: bytes and time to render;
5. the command's refusals (a missing store, a busy port): seconds from start to the one-line error.

  .venv/bin/python benchmarks/view_latency.py [--examples 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.view_html import colours, example_body, heatmap_svg
from storage_schemas.attention_store import (
    AttentionStoreLayout,
    create_attention_store,
    mark_prepared,
    mark_shard_completed,
    use_fast_codec_pipeline,
    write_example_metadata,
    write_shard,
)
from storage_schemas.efficient_store import (
    DIAGNOSTIC_ARRAYS,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
    write_efficient_shard,
)
from storage_schemas.store_view import StoreView

VARIANTS = ("effective", "stochastic", "simplex")


def build_store(url: str, examples: int, length: int = 512) -> None:
    """A store of `examples` examples of `length` tokens with MiniLM's shapes, one shard each, every variant done."""
    layout = AttentionStoreLayout(
        n_examples=examples,
        max_length=length,
        n_classes=2,
        layers=6,
        heads=12,
        kv_heads=12,
        head_dim=32,
        hidden=384,
        shard_size=1,
        dtype="float32",
    )
    group = create_attention_store(
        url,
        layout,
        {
            "corpus": {"name": "synthetic", "digest": "none", "class_names": ["neg", "pos"]},
            "model": {"name": "minilm-shaped", "weights_digest": "none"},
        },
    )
    lengths = np.full(examples, length)
    write_example_metadata(
        group,
        np.tile(np.arange(length, dtype=np.int32), (examples, 1)),
        lengths,
        lengths,
        np.arange(examples),
        np.zeros(examples),
        [f"example {i}" for i in range(examples)],
    )
    group["w_out"][:] = 0.0
    mark_prepared(group)
    rng = np.random.default_rng(0)
    settings = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}
    for variant in VARIANTS:
        prepare_efficient_arrays(group, url, variant, settings)
    for shard in range(examples):
        scores = rng.normal(size=(1, 6, 12, length, length)).astype(np.float32)
        attention = np.exp(scores) / np.exp(scores).sum(axis=-1, keepdims=True)
        write_shard(group, shard, attention, np.zeros((1, 6, 12, length, 32), np.float32), np.zeros((1, 2)))
        mark_shard_completed(group, shard)
        for variant in VARIANTS:
            efficient = attention + rng.normal(scale=1e-3, size=attention.shape).astype(np.float32)
            diagnostics = {name: np.zeros((1, 6, 12), dtype=dtype) for name, (dtype, _) in DIAGNOSTIC_ARRAYS.items()}
            write_efficient_shard(group, layout, variant, shard, efficient, diagnostics)
            mark_efficient_shard_completed(group, variant, shard)


def per_cell_svg(matrix: np.ndarray) -> str:
    """The alternative form: one <rect> per cell, its value in data-value."""
    rgb = colours(matrix, "sequential", float(matrix.max()))
    rows, cols = matrix.shape
    return (
        "<svg>"
        + "".join(
            f'<rect x="{j * 2}" y="{i * 2}" width="2" height="2" fill="rgb({r},{g},{b})" '
            f'data-value="{matrix[i, j]!r}"/>'
            for i in range(rows)
            for j in range(cols)
            for r, g, b in [rgb[i, j]]
        )
        + "</svg>"
    )


def refusal_seconds(arguments: list[str]) -> tuple[float, str]:
    effattn = os.path.join(os.path.dirname(sys.executable), "effattn")
    started = time.perf_counter()
    completed = subprocess.run([effattn, "view", *arguments], capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started, completed.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    use_fast_codec_pipeline()
    folder = tempfile.mkdtemp(prefix="effattn-view-bench-")
    try:
        url = os.path.join(folder, "store.zarr")
        started = time.perf_counter()
        build_store(url, arguments.examples)
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(url) for name in names)
        print(
            f"store: {arguments.examples} examples x 512 tokens, 6 layers x 12 heads, 3 variants; "
            f"{size / 2**20:.0f} MiB on disk; built in {time.perf_counter() - started:.1f} s"
        )

        from starlette.testclient import TestClient

        from flows.view import create_app

        view = StoreView(url)
        client = TestClient(create_app(view))
        server, wall, page_bytes = [], [], 0
        for repeat in range(arguments.repeats):
            index, layer, head = repeat % arguments.examples, repeat % 6, (5 * repeat) % 12
            started = time.perf_counter()
            response = client.get(f"/example/{index}?layer={layer}&head={head}&variant=simplex")
            wall.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            server.append(float(response.headers["server-timing"].split("dur=")[1]) / 1000)
            page_bytes = len(response.content)
        reads, renders = [], []
        for repeat in range(arguments.repeats):
            started = time.perf_counter()
            data = view.example(repeat % arguments.examples, (repeat + 1) % 6, 3)
            reads.append(time.perf_counter() - started)
            started = time.perf_counter()
            example_body(data, "simplex", {})
            renders.append(time.perf_counter() - started)
        print(
            f"load average of this machine (1, 5, 15 min): {', '.join(f'{load:.1f}' for load in os.getloadavg())} "
            f"on {os.cpu_count()} cores"
        )
        print(
            f"example view at 512 tokens (A, 3 x E, A - E), {arguments.repeats} requests over "
            f"{arguments.examples} examples and several (layer, head):"
        )
        print(
            f"  server-side time: median {statistics.median(server):.3f} s (first {server[0]:.3f} s, max "
            f"{max(server):.3f} s); at the client {statistics.median(wall):.3f} s"
        )
        print(
            f"  of which reading one example's blocks: median {statistics.median(reads):.3f} s; rendering: "
            f"median {statistics.median(renders):.3f} s"
        )
        print(f"  page: {page_bytes / 2**20:.2f} MiB")

        import zarr

        attention = zarr.open_group(url, mode="r")["attention"]
        one_head, whole = [], []
        for repeat in range(arguments.repeats):
            started = time.perf_counter()
            attention[repeat % arguments.examples, 2, 7, :, :]
            one_head.append(time.perf_counter() - started)
            started = time.perf_counter()
            attention[repeat % arguments.examples]
            whole.append(time.perf_counter() - started)
        print(
            f"one array of one example: one (layer, head) block median {statistics.median(one_head):.3f} s; its "
            f"whole chunk (every layer and head, to keep) median {statistics.median(whole):.3f} s"
        )

        matrix = data.attention
        started = time.perf_counter()
        png_form = heatmap_svg(matrix, data.tokens, "A", "attention", "sequential", float(matrix.max()))
        png_seconds = time.perf_counter() - started
        started = time.perf_counter()
        cell_form = per_cell_svg(matrix)
        cell_seconds = time.perf_counter() - started
        print("one 512 x 512 heatmap:")
        print(f"  PNG + data-matrix (used): {len(png_form) / 2**20:.2f} MiB, {png_seconds:.3f} s to render")
        print(
            f"  one <rect> per cell:      {len(cell_form) / 2**20:.2f} MiB, {cell_seconds:.3f} s to render "
            f"({len(cell_form) / len(png_form):.1f}x the bytes)"
        )

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            for name, command in (
                ("missing store", [os.path.join(folder, "nothing.zarr")]),
                ("busy port", [url, "--port", str(busy.getsockname()[1])]),
            ):
                seconds, message = refusal_seconds(command)
                print(f"refusal, {name}: {seconds:.2f} s: {message}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
