"""`effattn view`: a local web server over one attention store (with its causal and explanation results), read-only.

Starlette and uvicorn (both installed with Prefect) serve three kinds of page rendered on the server
(analysis/view_html.py) from what storage_schemas/store_view.py reads: the overview (`/`), the example table
(`/examples`, paged by the server) and the example view (`/example/{index}?layer=&head=&variant=`). Request values
are numbers or names checked against the store, never paths. An example, layer, head or variant that is not in the
store gets a 404 and a malformed value a 400, each with a one-line JSON body `{"error": "..."}`. Every response
carries its server-side time in a `Server-Timing` header (benchmarks/view_latency.py reads it).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from analysis import view_html
from flows.settings import ViewSettings
from storage_schemas.store_view import StoreView, TableQuery, ViewRequestError, parse_bool, parse_int


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)  # one line


def provenance_rows(view: StoreView) -> list[tuple[str, str]]:
    """What the overview says about where the store came from (its root attributes) and how complete it is."""
    from analysis.report_html import model_description

    attributes = view.attributes
    corpus = attributes.get("corpus") or {}
    layout = view.layout
    rows = [
        ("store", view.url),
        ("model", model_description(attributes.get("model") or {})),
        ("tokenizer", str((attributes.get("tokenizer") or {}).get("name_or_path", "unknown"))),
        ("corpus", f"{corpus.get('name', 'unknown')} ({corpus.get('digest', 'no digest')})"),
        (
            "examples",
            f"{layout.n_examples} ({len(view.visible_examples())} extracted: {len(view.shards)} of "
            f"{layout.n_shards} shards of {layout.shard_size})",
        ),
        ("task", layout.task),
        ("max length", str(layout.max_length)),
        ("stored layers / heads", view.selection.describe()),
        ("dtype", layout.dtype),
        ("created", str(attributes.get("created", "unknown"))),
    ]
    for variant, shards in view.variant_shards.items():
        rows.append((f"efficient/{variant}", f"{len(shards)} of {layout.n_shards} shards"))
    if view.results_url:
        rows.append(("causal results", f"{view.results_url} ({len(view.result_shards)} shards complete)"))
    if view.explanations_url:
        rows.append(("explanations", f"{view.explanations_url} ({len(view.explanation_shards)} shards complete)"))
    return rows


def create_app(view: StoreView) -> Starlette:
    """The web app over `view` (one lock: a StoreView is used by one request at a time)."""
    lock = threading.Lock()

    def overview(request: Request) -> Response:
        with lock:
            view.refresh()
            grids = {variant: view.null_norm_grid(variant) for variant in view.variants}
            visible = view.visible_examples()
            example = int(visible[len(visible) // 2]) if len(visible) else None  # a middle length: stored by length
            body = view_html.overview_body(
                provenance_rows(view), view.claims(), grids, view.selection.layers, view.selection.heads, example
            )
        return HTMLResponse(view_html.page(f"effattn view: {view.url}", body))

    def examples(request: Request) -> Response:
        parameters = request.query_params
        order = parameters.get("order") or "asc"
        if order not in ("asc", "desc"):
            raise ViewRequestError(400, f"order must be asc or desc, got {order!r}")
        query = TableQuery(
            offset=parse_int(parameters.get("offset"), "offset", 0),
            limit=parse_int(parameters.get("limit"), "limit", 25),
            sort=parameters.get("sort") or "index",
            descending=order == "desc",
            search=parameters.get("search") or "",
            label=parse_int(parameters.get("label"), "label"),
            correct=parse_bool(parameters.get("correct"), "correct"),
            outcome=parameters.get("outcome") or None,
            outcome_value=parse_bool(parameters.get("outcome_value"), "outcome_value"),
        )
        with lock:
            view.refresh()
            table = view.table(query)
            outcomes = [column for column in view.columns if column.startswith("flipped by ")]
            body = view_html.examples_body(
                table.rows,
                table.columns,
                {**dict(parameters), "offset": query.offset, "limit": query.limit},
                table.total,
                table.more,
                view.class_names(),
                outcomes,
            )
        return HTMLResponse(view_html.page(f"examples of {view.url}", body))

    def example(request: Request) -> Response:
        parameters = request.query_params
        index = parse_int(request.path_params["index"], "example")
        layers, heads = list(view.selection.layers), list(view.selection.heads)
        layer = parse_int(parameters.get("layer"), "layer", layers[0])
        head = parse_int(parameters.get("head"), "head", heads[0])
        with lock:
            view.refresh()
            data = view.example(index, layer, head)
            variant = parameters.get("variant") or (next(iter(data.efficient), None))
            if variant is not None and variant not in data.efficient:
                raise ViewRequestError(
                    404,
                    f"variant {variant!r} is not computed for example {index}: it has {list(data.efficient) or 'none'}",
                )
            visible = view.visible_examples()
            position = int(np.searchsorted(visible, index))

            def at(**changes: Any) -> str:
                return view_html.link(
                    f"/example/{changes.pop('index', index)}",
                    **{"layer": layer, "head": head, "variant": variant, **changes},
                )

            li, hi = layers.index(layer), heads.index(head)
            navigation = {
                "prev-example": at(index=int(visible[position - 1])) if position > 0 else None,
                "next-example": at(index=int(visible[position + 1])) if position + 1 < len(visible) else None,
                "prev-layer": at(layer=layers[li - 1]) if li > 0 else None,
                "next-layer": at(layer=layers[li + 1]) if li + 1 < len(layers) else None,
                "prev-head": at(head=heads[hi - 1]) if hi > 0 else None,
                "next-head": at(head=heads[hi + 1]) if hi + 1 < len(heads) else None,
                **{f"variant-{name}": at(variant=name) for name in data.efficient},
            }
            body = view_html.example_body(data, variant, navigation)
        return HTMLResponse(view_html.page(f"example {index}, layer {layer}, head {head}", body, data.tokens))

    async def request_error(request: Request, error: Exception) -> Response:
        return _error(error.status, str(error))

    async def http_error(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 500)
        return _error(
            status,
            f"no page at {request.url.path}: the pages are /, /examples and /example/INDEX"
            if status == 404
            else getattr(error, "detail", "error"),
        )

    return Starlette(
        routes=[Route("/", overview), Route("/examples", examples), Route("/example/{index}", example)],
        exception_handlers={ViewRequestError: request_error, HTTPException: http_error},
        middleware=[Middleware(ServerTiming)],
    )


class ServerTiming:
    """ASGI middleware: every response says how long the server took to make it (`Server-Timing: view;dur=MS`)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"view;dur={1000 * (time.perf_counter() - started):.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


def check_port_free(host: str, port: int) -> None:
    """Refuse (ValueError) a port another process listens on, before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"cannot listen on {host}:{port} ({error.strerror or error}): another program uses the "
                "port; choose another with --port"
            ) from None


def host_warning(host: str) -> str | None:
    """The warning printed for a host other than loopback (None for loopback)."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (
        f"warning: serving on {host}: the store (texts, attention, results) becomes readable by anyone who can "
        "reach this port; use --host 127.0.0.1 to keep it local"
    )


def view_command(store: str, results: str | None = None, explanations: str | None = None) -> str:
    """The `effattn view` command line for a store (what `effattn run` and `effattn report` print)."""
    import shlex

    parts = ["effattn", "view", shlex.quote(store)]
    if results:
        parts += ["--results", shlex.quote(results)]
    if explanations:
        parts += ["--explanations", shlex.quote(explanations)]
    return " ".join(parts)


def serve_view(settings: ViewSettings) -> None:
    """Open the store (its checks raise before anything listens), print the URL and serve until interrupted."""
    import uvicorn

    from analysis.report_figures import load_local_tokenizer

    view = StoreView(settings.store, settings.results, settings.explanations)
    view.tokenizer = load_local_tokenizer((view.attributes.get("tokenizer") or {}).get("name_or_path"))
    warning = host_warning(settings.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(
        create_app(view), host=settings.host, port=settings.port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"serving {settings.store} at http://{shown_host}:{settings.port}/ (Ctrl-C stops)", flush=True)
    server.run()
