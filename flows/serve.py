"""`effattn serve`: the pipeline as a Prefect deployment with a schedule, served by this process.

Schedules live on a Prefect server: the server creates the scheduled flow runs, and this process (a Prefect
runner) polls it and runs them, one at a time (two runs must never write the same store at once). An ephemeral
server, which Prefect starts by itself when no PREFECT_API_URL is set, would stop with this process and forget the
schedule, so serving refuses to start without a real server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.prefect_server import ServeError, check_server, prefect_api_url
from flows.settings import PipelineSettings, ServeSettings

# Parameters of run_pipeline that name local files or folders: made absolute, so that the deployment's parameters
# (shown by the server) say exactly what a scheduled run reads and writes.
PATH_PARAMETERS = ("run_dir", "store", "results", "report_dir", "corpus", "model", "cache_root")


def schedule_arguments(cron: str | None, interval: float | None) -> dict[str, Any]:
    """The schedule keyword of `Flow.serve`: {"cron": cron} or {"interval": seconds}; exactly one must be given."""
    if (cron is None) == (interval is None):
        raise ServeError('give exactly one schedule: --cron "MIN HOUR DAY MONTH WEEKDAY" or --interval SECONDS')
    if interval is not None:
        if interval <= 0:
            raise ServeError(f"--interval must be a positive number of seconds, got {interval}")
        return {"interval": interval}
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as error:  # pydantic's ValidationError: keep its message, not its boilerplate
        detail = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
        raise ServeError(
            f"--cron {cron!r} is not a valid cron expression (five fields: minute hour day month weekday, "
            f'e.g. "0 3 * * *" for 03:00 every day): {detail}'
        ) from None
    return {"cron": cron}


def absolute_paths(parameters: dict[str, Any]) -> dict[str, Any]:
    """`parameters` with the local paths among PATH_PARAMETERS made absolute (run_dir always; the others when they
    exist, so that bundled names such as `rt-sentiment`, `minilm` and fsspec URLs stay as they are)."""
    resolved = dict(parameters)
    for key in PATH_PARAMETERS:
        value = resolved.get(key)
        if not isinstance(value, str) or "://" in value:
            continue
        if key in ("run_dir", "store", "results", "report_dir", "cache_root") or Path(value).exists():
            resolved[key] = str(Path(value).expanduser().resolve())
    return resolved


def serve_pipeline(pipeline: PipelineSettings, schedule: ServeSettings) -> None:
    """Serve run_pipeline(pipeline) as the deployment `effattn-pipeline/<schedule.name>` with the cron or interval
    schedule of `schedule`, on the server at PREFECT_API_URL, until interrupted (the schedule is paused on
    shutdown). The deployment's parameter is `settings`: the pipeline settings as JSON, local paths absolute.

    Raises:
        ServeError: no PREFECT_API_URL, no server answering there, no schedule or two, a bad cron expression.
    """
    from prefect import serve
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import run_pipeline

    schedule_keywords = schedule_arguments(schedule.cron, schedule.interval)
    api_url = prefect_api_url()
    check_server(api_url)
    # A deployment served from its module path: each run imports flows.pipeline afresh in its own process
    # (`python -m prefect.engine`). Flow.serve would instead pickle the in-memory flow by value, which loses the
    # names that the stage flows' string annotations refer to (their parameter validation then fails).
    deployment = run_pipeline.to_deployment(
        name=schedule.name,
        parameters={"settings": absolute_paths(pipeline.model_dump(mode="json"))},
        description="effattn: (train if needed) -> extract -> efficient -> causal -> report, on a schedule",
        entrypoint_type=EntrypointType.MODULE_PATH,
        **schedule_keywords,
    )
    serve(deployment, limit=1, pause_on_shutdown=True)
