"""The Prefect API a command talks to: the server at PREFECT_API_URL, or a temporary one started on first use.

Prefect starts a temporary server by itself when no PREFECT_API_URL is set. Two things go wrong with it as it comes:
on a busy 2-core machine it misses Prefect's 20 s startup limit, and it runs in the terminal's process group, so
Ctrl-C stops it at the same instant as the run, which then spends a minute retrying to report its crash and its logs
to a server that is gone ("Error logging to API"). `use_prefect_api()` fixes both: a startup limit that survives a
loaded machine, and a temporary server outside the process group (it stops when this process ends: at exit, and by
the kernel's parent-death signal if this process is killed). When the server cannot be reached, one line says what
to do (`PrefectServerError`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

# Prefect's own setting (seconds); its default of 20 s is missed on a loaded 2-core machine (it took 9-24 s here
# with four other jobs running).
STARTUP_TIMEOUT_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_SECONDS = 120
# How long a configured PREFECT_API_URL may take to answer its health check.
HEALTH_CHECK_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1
SERVER_LOG_NAME = "effattn-temporary-server.log"


def start_server_hint(command: str) -> str:
    """What to do when `effattn COMMAND` has no Prefect server: start one and point PREFECT_API_URL at it."""
    return (
        "start a Prefect server with `prefect server start --host 127.0.0.1 --port 4200` and, in the shell that runs "
        f"`effattn {command}`, `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
    )


class PrefectServerError(ValueError):
    """No Prefect server to talk to: the message says why and what to do (a ValueError, as other errors of
    the user's setup, so that the CLI prints it as one line)."""


def set_startup_timeout_default(environment: dict[str, str] | None = None) -> int:
    """Give the temporary server `DEFAULT_STARTUP_TIMEOUT_SECONDS` to start unless the user chose a limit (the
    variable, in `environment`, default os.environ). Returns the limit in force, in whole seconds (Prefect's type);
    a `PrefectServerError` when the user's value is not one."""
    environment = os.environ if environment is None else environment
    text = environment.setdefault(STARTUP_TIMEOUT_VARIABLE, str(DEFAULT_STARTUP_TIMEOUT_SECONDS))
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise PrefectServerError(
            f"{STARTUP_TIMEOUT_VARIABLE}={text!r} is not a whole number of seconds: set it to e.g. 300, or unset it "
            f"(default {DEFAULT_STARTUP_TIMEOUT_SECONDS})"
        )
    return seconds


def _parent_death_signal() -> Callable[[], object] | None:
    """A `preexec_fn` that makes the child get SIGTERM when the thread that started it ends (Linux's prctl); None
    elsewhere. The function is looked up here, before the fork: the child only calls it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, _PR_SET_PDEATHSIG, int(signal.SIGTERM))


def server_log_path() -> Path:
    """The file that receives the output of every temporary server of this Prefect home (appended)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / SERVER_LOG_NAME


@functools.cache
def _temporary_server_class() -> type:
    """The class, made on first use (importing Prefect's server module costs seconds)."""
    from prefect.server.api.server import SubprocessASGIServer

    class TemporaryServer(SubprocessASGIServer):
        """Prefect's temporary server, started in its own process group (a terminal's Ctrl-C and a SIGTERM to the
        run's group leave it up until the run has reported its end), with the startup limit of the settings, and a
        `PrefectServerError` of one line when it does not answer in time."""

        command = "COMMAND"  # the effattn sub-command, named in that error

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect 3.9's command (prefect/server/api/server.py), started outside this process group.
            import prefect
            from prefect.settings import get_current_settings

            on_main_thread = threading.current_thread() is threading.main_thread()
            settings = get_current_settings()
            # Its output goes to a file: a server stopped at the end of a run may log tracebacks of events it was
            # still recording, which would bury the run's last line.
            log_path = server_log_path()
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as log:
                return subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "--app-dir",
                        str(prefect.__module_path__.parent),
                        "--factory",
                        "prefect.server.api.server:create_app",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(self.port),
                        "--log-level",
                        "error",
                        "--lifespan",
                        "on",
                    ],
                    env={
                        **os.environ,
                        "PREFECT_UI_ENABLED": "0",
                        "PREFECT__SERVER_EPHEMERAL": "1",
                        "PREFECT__SERVER_FINAL": "1",
                        **settings.to_environment_variables(exclude_unset=True),
                    },
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                    # The parent-death signal follows the thread that starts the child: only the main thread
                    # lives as long as the process.
                    preexec_fn=_parent_death_signal() if on_main_thread else None,
                )

        def start(self, timeout: int | None = None) -> None:
            if self.running:
                return
            limit = timeout or set_startup_timeout_default()
            try:
                super().start(timeout=limit)
            except RuntimeError as error:
                self.stop()
                detail = str(error).split(" stdout:")[0]
                raise PrefectServerError(
                    f"the temporary Prefect server did not answer within {limit} s ({detail.rstrip('.')}; a busy "
                    f"machine starts it slowly; its output: {server_log_path()}): {start_server_hint(self.command)}, "
                    f"or allow it more time with `export {STARTUP_TIMEOUT_VARIABLE}=300`"
                ) from None

    return TemporaryServer


def install_temporary_server(command: str) -> None:
    """Make the temporary server that Prefect starts on first use (when no PREFECT_API_URL is set) a
    `TemporaryServer` (its error names `effattn COMMAND`). Starts nothing: commands that fail before Prefect is
    needed start no server."""
    from prefect.server.api.server import SubprocessASGIServer

    server_class = _temporary_server_class()
    current = SubprocessASGIServer._instances.get(None)
    if isinstance(current, server_class):
        current.command = command
    elif current is None or not current.running:
        SubprocessASGIServer._instances.pop(None, None)
        server_class().command = command  # registers itself as the server of no fixed port, the one Prefect starts


def kill_temporary_server() -> None:
    """Stop the temporary server at once, if one runs (no wait: for a process that is about to exit)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    process = getattr(server, "server_process", None)
    if process is not None and process.poll() is None:
        process.kill()


def configured_api_url() -> str | None:
    """PREFECT_API_URL of the current settings (the variable or the active profile), or None."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url).rstrip("/") if url else None


def health_check_failure(api_url: str, timeout_seconds: float = HEALTH_CHECK_SECONDS) -> str | None:
    """Why the Prefect server at `api_url` did not answer its health check within `timeout_seconds` (the error,
    e.g. "ConnectError: [Errno 111] Connection refused"); None when it answered."""
    import httpx

    try:
        response = httpx.get(f"{api_url}/health", timeout=timeout_seconds)
        response.raise_for_status()
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    return None


def use_prefect_api(command: str) -> None:
    """Before `effattn COMMAND` runs flows: check the server at PREFECT_API_URL, or prepare the temporary one.

    Raises `PrefectServerError` when PREFECT_API_URL is set and nothing answers there (within
    `HEALTH_CHECK_SECONDS`, instead of Prefect's minute of retries)."""
    set_startup_timeout_default()
    api_url = configured_api_url()
    if api_url is None:
        install_temporary_server(command)
        return
    failure = health_check_failure(api_url)
    if failure is not None:
        raise PrefectServerError(
            f"no Prefect server answers at PREFECT_API_URL={api_url} ({failure}): {start_server_hint(command)}; or "
            "unset PREFECT_API_URL to let effattn start a temporary one"
        )


# `effattn serve`'s server checks (its pre-flight, flows/preflight.py, reads them without importing the pipeline).
START_SERVER = start_server_hint("serve")


class ServeError(ValueError):
    """`effattn serve` cannot start: the message says why and what to do."""


def prefect_api_url() -> str:
    """The Prefect API URL of the current settings (PREFECT_API_URL or the active profile); a ServeError if none."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ServeError(f"PREFECT_API_URL is not set, and scheduled runs need a real Prefect server: {START_SERVER}")
    return str(url).rstrip("/")


def check_server(api_url: str, timeout_seconds: float = 10.0) -> None:
    """A ServeError unless the Prefect server at `api_url` answers its health check."""
    failure = health_check_failure(api_url, timeout_seconds)
    if failure is not None:
        raise ServeError(f"no Prefect server answers at PREFECT_API_URL={api_url} ({failure}): {START_SERVER}")


def check_serving_server() -> None:
    """The pre-flight of `effattn serve` (flows/preflight.py): a ServeError unless PREFECT_API_URL is set and a
    Prefect server answers there. Reads the variable itself, so that Prefect is imported only when it is not set
    (the active Prefect profile may still name a server)."""
    import os

    api_url = os.environ.get("PREFECT_API_URL", "").rstrip("/") or prefect_api_url()
    check_server(api_url)
