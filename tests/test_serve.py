"""flows.serve and `effattn serve`: refusals without a server, the schedule options, and a scheduled run on a real
`prefect server start` (loopback, own PREFECT_HOME and sqlite database) that writes a complete store."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main
from flows.serve import ServeError, absolute_paths, schedule_arguments
from storage_schemas.attention_store import AttentionStoreError, completed_shards, open_attention_store, store_layout
from storage_schemas.efficient_store import efficient_completed_shards
from storage_schemas.pipeline_runs import EXTRACTION_INPUTS_ATTRIBUTE
from tests.conftest import write_reviews_csv

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 180  # seconds; the first start migrates a new sqlite database
RUN_TIMEOUT = 300  # seconds until one scheduled run has completed (2 shared cores: generous)
START_SERVER_HINT = (
    "start a Prefect server with `prefect server start --host 127.0.0.1 --port 4200` and, in the shell that runs "
    "`effattn serve`, `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- refusals and options (no server) ---


def test_serve_refuses_without_prefect_api_url(capsys):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--interval", "5"]) == 2
    expected = (
        "effattn serve: error: PREFECT_API_URL is not set, and scheduled runs need a real Prefect server: "
        + START_SERVER_HINT
    )
    assert capsys.readouterr().err.strip() == expected


def test_serve_refuses_when_no_server_answers(capsys):
    url = f"http://127.0.0.1:{free_loopback_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["serve", "--cron", "0 3 * * *"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"effattn serve: error: no Prefect server answers at PREFECT_API_URL={url} (ConnectError")
    assert error.strip().endswith(START_SERVER_HINT)


def test_serve_needs_exactly_one_schedule(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    assert "one of the arguments --cron --interval is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--cron", "0 3 * * *", "--interval", "5"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_schedule_arguments():
    assert schedule_arguments(None, 5) == {"interval": 5}
    assert schedule_arguments("0 3 * * *", None) == {"cron": "0 3 * * *"}
    with pytest.raises(ServeError, match=re.escape("give exactly one schedule")):
        schedule_arguments(None, None)
    with pytest.raises(ServeError, match=re.escape("give exactly one schedule")):
        schedule_arguments("0 3 * * *", 5)
    with pytest.raises(ServeError, match=re.escape("--interval must be a positive number of seconds, got 0")):
        schedule_arguments(None, 0)
    with pytest.raises(ServeError, match=re.escape("--cron 'every day' is not a valid cron expression")):
        schedule_arguments("every day", None)


def test_absolute_paths_resolve_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_reviews_csv(tmp_path / "reviews.csv")
    resolved = absolute_paths(
        {"run_dir": "runs", "corpus": "reviews.csv", "model": "minilm", "store": "s3://bucket/a.zarr", "limit": 3}
    )
    assert resolved == {
        "run_dir": str(tmp_path / "runs"),
        "corpus": str(tmp_path / "reviews.csv"),
        "model": "minilm",  # a bundled name, not a path here
        "store": "s3://bucket/a.zarr",
        "limit": 3,
    }


# --- a scheduled run on a real Prefect server ---


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group led by `process` (it was started in its own session), SIGKILL what is left after
    30 s, and wait for the leader."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        process.poll()
        time.sleep(0.5)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def group_is_gone(process: subprocess.Popen) -> bool:
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return True
    return False


def log_tail(path: Path, characters: int = 4000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.exists() else "(no output)"


@pytest.fixture()
def prefect_server(tmp_path):
    """A `prefect server start` on a free loopback port with its own PREFECT_HOME and sqlite database; yields its
    API URL; stops its whole process group afterwards, whatever happened."""
    home = tmp_path / "server-home"
    home.mkdir()
    port = free_loopback_port()
    environment = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    environment.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
                "--analytics-off",
            ],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{log_tail(log)}")
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer /api/health in {SERVER_START_TIMEOUT} s:\n{log_tail(log)}")
            time.sleep(1)
        yield api_url
    finally:
        stop_process_group(server)
        assert group_is_gone(server), "the prefect server's process group survived SIGTERM and SIGKILL"


def effattn_command() -> list[str]:
    script = Path(sys.executable).parent / "effattn"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]


def finished_flow_runs(api_url: str, deployment_name: str, limit: int = 20) -> list[dict]:
    """The deployment's flow runs that have ended: completed, failed or crashed (the schedule also creates many
    future runs; they are left out)."""
    response = httpx.post(
        f"{api_url}/flow_runs/filter",
        json={
            "deployments": {"name": {"any_": [deployment_name]}},
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
            "limit": limit,
        },
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def serve_environment(api_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of an `effattn serve` against the test's server, with its own home and head cache."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(tmp_path / "serve-home"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
        "EFFATTN_CACHE": str(tmp_path / "cache"),
    }


def start_serve(arguments: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen:
    """`effattn serve <arguments>` in its own process group, its output in `log`."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [*effattn_command(), "serve", *arguments],
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finished_runs_or_fail(api_url: str, deployment: str, serve: subprocess.Popen, log: Path) -> list[dict]:
    """The deployment's finished flow runs; the test fails when `effattn serve` exited or a run failed or crashed."""
    if serve.poll() is not None:
        pytest.fail(f"effattn serve exited with {serve.returncode}:\n{log_tail(log)}")
    runs = finished_flow_runs(api_url, deployment, limit=200)
    broken = [run for run in runs if run["state_type"] in ("FAILED", "CRASHED")]
    if broken:
        state = broken[0]["state"]
        pytest.fail(f"a scheduled run ended {state['type']}: {state.get('message')}\n{log_tail(log)}")
    return runs


def test_scheduled_run_on_a_real_prefect_server(prefect_server, tmp_path, tiny_bert_folder):
    api_url = prefect_server
    corpus = write_reviews_csv(tmp_path / "reviews.csv")
    run_dir = tmp_path / "runs"
    deployment = "effattn-test-schedule"
    log = tmp_path / "serve.log"
    serve = start_serve(
        [
            *("--interval", "5", "--name", deployment, "--corpus", str(corpus), "--model", str(tiny_bert_folder)),
            *("--limit", "5", "--max-length", "16", "--shard-size", "4", "--batch-size", "5"),
            *("--variants", "effective", "--workers", "1", "--run-dir", str(run_dir)),
        ],
        serve_environment(api_url, tmp_path),
        log,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        completed = None
        while completed is None:
            runs = finished_runs_or_fail(api_url, deployment, serve, log)
            completed = next((run for run in runs if run["state_type"] == "COMPLETED"), None)
            if completed is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"no scheduled run completed in {RUN_TIMEOUT} s:\n{log_tail(log)}")
                time.sleep(2)
    finally:
        stop_process_group(serve)
        assert group_is_gone(serve), "effattn serve's process group survived SIGTERM and SIGKILL"

    assert completed["auto_scheduled"] is True  # created by the schedule, not triggered by hand
    assert completed["parameters"]["settings"]["run_dir"] == str(run_dir)  # made absolute by effattn serve
    stores = sorted(
        path for path in run_dir.glob("*.zarr") if not path.name.endswith((".results.zarr", ".explanations.zarr"))
    )
    assert len(stores) == 1
    # max length 16 is not the default: the settings digest is part of the name
    assert re.fullmatch(rf"reviews-{re.escape(tiny_bert_folder.name)}-5-[0-9a-f]{{8}}\.zarr", stores[0].name)
    group = open_attention_store(str(stores[0]))
    n_shards = store_layout(group).n_shards
    assert n_shards == 2
    assert completed_shards(group) == [0, 1]
    assert efficient_completed_shards(group, "effective") == [0, 1]
    assert group["efficient/effective"][:].any()
    assert group.attrs[EXTRACTION_INPUTS_ATTRIBUTE]["limit"] == 5


def wait_for_store(api_url: str, deployment: str, serve, log: Path, store: Path, n_examples: int) -> None:
    """Wait until `store` holds `n_examples` examples and a scheduled run has completed after that was first seen
    (the run that appended them, or a later one: every stage of that run is then done)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    completed_when_seen = None
    while True:
        runs = finished_runs_or_fail(api_url, deployment, serve, log)
        completed = sum(run["state_type"] == "COMPLETED" for run in runs)
        if completed_when_seen is None and examples_in(store) == n_examples:
            completed_when_seen = completed
        if completed_when_seen is not None and completed > completed_when_seen:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no scheduled run completed with {n_examples} examples in {RUN_TIMEOUT} s:\n{log_tail(log)}")
        time.sleep(1)


def examples_in(store: Path) -> int | None:
    """The examples the store holds, None while it is being created or appended to."""
    try:
        return store_layout(open_attention_store(str(store))).n_examples
    except AttentionStoreError:
        return None


GROWTH_OPTIONS = [
    "--all",
    "--no-train",
    "--max-length",
    "16",
    "--shard-size",
    "16",
    "--batch-size",
    "16",
    "--variants",
    "effective",
    "--all-scope-examples",
    "--explain-examples",
    "80",
]


def test_scheduled_runs_over_a_growing_corpus_compute_only_what_is_new(prefect_server, tmp_path, tiny_bert_folder):
    """Three scheduled runs over a file growing 48 -> 64 -> 80 rows: the second and third add 16 examples each and
    leave everything computed before as it was; the store, results and explanations equal a from-scratch run."""
    from tests.store_builders import assert_run_outputs_equal, write_corpus

    api_url = prefect_server
    rows = write_corpus(tmp_path / "all.csv", copies=8).read_text(encoding="utf-8").splitlines(keepends=True)
    feed = tmp_path / "feed" / "reviews.csv"
    feed.parent.mkdir()
    feed.write_text("".join(rows[: 1 + 48]), encoding="utf-8")
    run_dir = tmp_path / "runs"
    deployment = "effattn-test-growth"
    environment = serve_environment(api_url, tmp_path)
    arguments = ["--corpus", str(feed), "--model", str(tiny_bert_folder), *GROWTH_OPTIONS]
    log = tmp_path / "serve.log"
    serve = start_serve(
        ["--interval", "10", "--name", deployment, *arguments, "--run-dir", str(run_dir)], environment, log
    )
    try:
        store = None
        identities_after = []
        for n_rows in (48, 64, 80):
            feed.write_text("".join(rows[: 1 + n_rows]), encoding="utf-8")
            if store is None:
                deadline = time.monotonic() + RUN_TIMEOUT
                while not (stores := [p for p in run_dir.glob("reviews-*.zarr") if p.name.count(".") == 1]):
                    if time.monotonic() > deadline or serve.poll() is not None:
                        pytest.fail(f"no store appeared:\n{log_tail(log)}")
                    time.sleep(2)
                store = stores[0]
            wait_for_store(api_url, deployment, serve, log, store, n_rows)
            identities_after.append(computed_shards(store))
    finally:
        stop_process_group(serve)
        assert group_is_gone(serve), "effattn serve's process group survived SIGTERM and SIGKILL"

    group = open_attention_store(str(store))
    assert [run["examples_added"] for run in group.attrs["runs"]] == [48, 16, 16]
    # what each run computed: the shards of the earlier runs keep the identities they had (nothing recomputed)
    # (the store's shards of 16 are whole: extract, efficient and causal add one shard each run; the explanations,
    # in shards of 8 of the examples where efficient attention differs from A, compute their last shard again when
    # it was partial, copying its earlier rows, tests/test_explain_flow.py)
    for earlier, later in zip(identities_after, identities_after[1:]):
        for output, shards in earlier.items():
            kept = shards if output != "explanations" else {key: shards[key] for key in sorted(shards, key=int)[:-1]}
            assert {key: later[output][key] for key in kept} == kept, output
        assert all(len(later[output]) == len(earlier[output]) + 1 for output in ("extract", "efficient", "results"))

    # one from-scratch run over the 80 rows
    scratch_dir = tmp_path / "scratch"
    scratch_feed = scratch_dir / "feed" / "reviews.csv"
    scratch_feed.parent.mkdir(parents=True)
    scratch_feed.write_text("".join(rows), encoding="utf-8")
    scratch_arguments = ["--corpus", str(scratch_feed), "--model", str(tiny_bert_folder), *GROWTH_OPTIONS]
    done = subprocess.run(
        [*effattn_command(), "run", *scratch_arguments, "--run-dir", str(scratch_dir / "runs")],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    scratch_store = scratch_dir / "runs" / store.name
    assert_run_outputs_equal(store, scratch_store, "effective")


def computed_shards(store: Path) -> dict[str, dict[str, str]]:
    """Each output's completed shards -> their identities: the store's extraction, efficient attention, causal results
    and explanations."""
    import zarr

    outputs = {"extract": zarr.open_group(str(store), mode="r").attrs.asdict()}
    outputs["efficient"] = zarr.open_group(str(store), mode="r")["efficient/effective"].attrs.asdict()
    base = str(store).removesuffix(".zarr")
    for kind in ("results", "explanations"):
        outputs[kind] = zarr.open_group(f"{base}-effective.{kind}.zarr", mode="r").attrs.asdict()
    return {
        output: {
            key: str(value)
            for key, value in (attributes.get("shard_identities") or attributes.get("shard_inputs") or {}).items()
        }
        for output, attributes in outputs.items()
    }
