"""Ctrl-C and SIGTERM: stop within seconds, with one line, leaving a store that the same command resumes.

A terminal's Ctrl-C sends SIGINT to the whole process group (Dask workers included), a process manager sends
SIGTERM. The first signal becomes a KeyboardInterrupt in the main thread, so the stage unwinds through its `finally`
blocks (the store's lock is released, a pending shard write ends, the Dask cluster closes) and Prefect records the
run as crashed. Prefect's console lines about the crash are dropped (the one line of `interruption_message` says
it all); further signals are ignored while stopping, and a stop that takes longer than `SHUTDOWN_SECONDS` ends
the process at once (the kernel releases the lock's flock; the next run takes over its record).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Longest a stop may take after the first signal before the process exits regardless (a hung thread or server).
SHUTDOWN_SECONDS = 15.0
# Commands that write stores: an interruption keeps the completed shards.
RESUMABLE_COMMANDS = ("extract", "efficient", "causal", "run", "studies")


@dataclass
class Interruption:
    """The signal received by this process (None: none yet) and the command it interrupts."""

    command: str = ""
    signal_number: int | None = None
    watching: bool = False  # inside `stops_cleanly_on_signals` on the main thread

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    @property
    def program(self) -> str:
        """How messages name the command: `effattn extract` (`effattn` before the command is known)."""
        return f"effattn {self.command}" if self.command else "effattn"

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + (self.signal_number or 0)


_interruption = Interruption()


def interrupted() -> bool:
    """Whether a SIGINT or SIGTERM has arrived: whatever is raised then is its consequence (Prefect may turn the
    KeyboardInterrupt into another error), and the wrapper of `main` reports the interruption, not that error."""
    return _interruption.signal_number is not None


def interruption_message(interruption: Interruption) -> str:
    """The one line printed when `interruption.command` stops on a signal."""
    prefix = f"{interruption.program}: interrupted by {interruption.signal_name}"
    if interruption.command in RESUMABLE_COMMANDS:
        return f"{prefix}: completed shards are kept; run the same command again to finish"
    return f"{prefix}: run the same command again to start over"


class _QuietWhileInterrupted(logging.Filter):
    """Drops Prefect's console records once a signal arrived, or while an interruption unwinds (Prefect's own
    SIGTERM handler raises its TerminationSignal before ours sees the signal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import ExternalSignal

        unwinding = sys.exc_info()[1]
        return _interruption.signal_number is None and not isinstance(unwinding, (KeyboardInterrupt, ExternalSignal))


def quiet_prefect_console_when_interrupted() -> None:
    """Prefect's console prints nothing about an interruption (its records still go to the API, which shows the
    crash); `interruption_message` is the one line."""
    import prefect.main  # noqa: F401  (what `from prefect import flow` does: it creates Prefect's log handlers)
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(existing, _QuietWhileInterrupted) for existing in handler.filters
            ):
                handler.addFilter(_QuietWhileInterrupted())


def _exit_if_still_running(interruption: Interruption, shutdown_seconds: float) -> None:
    """In a daemon thread: after `shutdown_seconds`, end the process (stopping the temporary server first)."""
    threading.Event().wait(shutdown_seconds)
    print(
        f"{interruption.program}: did not stop within {shutdown_seconds:g} s of {interruption.signal_name}; "
        "exiting now",
        file=sys.stderr,
        flush=True,
    )
    from flows.prefect_server import kill_temporary_server

    kill_temporary_server()
    os._exit(interruption.exit_status)


def _record_first_signal(signal_number: int, shutdown_seconds: float) -> bool:
    """Record the first signal and start the shutdown deadline; False when already stopping (a second Ctrl-C
    must not break the cleanup of the first)."""
    if _interruption.signal_number is not None:
        return False
    _interruption.signal_number = signal_number
    threading.Thread(
        target=_exit_if_still_running,
        args=(_interruption, shutdown_seconds),
        daemon=True,
        name="effattn-shutdown-deadline",
    ).start()
    return True


def _on_signal(signal_number: int, frame, shutdown_seconds: float) -> None:
    if _record_first_signal(signal_number, shutdown_seconds):
        raise KeyboardInterrupt


def record_signals_that_prefect_handles() -> None:
    """While a flow or task runs, Prefect's own SIGTERM handler replaces ours and raises its TerminationSignal.
    A task engine caught between states turns that into another error (`ValueError: Task run is not set`), which
    would end the command as `error: ...`, status 2, with no deadline on the stop. Prefect's handler is wrapped
    so that, inside `stops_cleanly_on_signals`, it records the signal first (the wrapper then reports the
    interruption, whatever it became) and ignores a second one as ours does."""
    import prefect.utilities.engine as engine  # capture_sigterm installs this module's `_prefect_sigterm_handler`

    prefect_handler = engine._prefect_sigterm_handler
    if getattr(prefect_handler, "records_the_interruption", False):
        return

    @functools.wraps(prefect_handler)
    def recording_handler(signal_number: int, *arguments: object) -> None:
        if not _interruption.watching or _record_first_signal(signal_number, SHUTDOWN_SECONDS):
            prefect_handler(signal_number, *arguments)

    recording_handler.records_the_interruption = True
    engine._prefect_sigterm_handler = recording_handler


def name_the_command(command: str) -> None:
    """The sub-command that an interruption's message names (`effattn COMMAND: interrupted by ...`)."""
    _interruption.command = command


def stops_cleanly_on_signals(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap the CLI's `main`: while it runs, the first SIGINT or SIGTERM becomes a KeyboardInterrupt (see the
    module's docstring); whatever the interruption then raises (the KeyboardInterrupt, Prefect's TerminationSignal,
    a Dask error about workers stopped by the same signal) ends in `interruption_message` and the signal's exit
    status. Without a signal, exceptions pass unchanged and the previous handlers are restored on return."""

    @functools.wraps(main)
    def wrapped(*arguments, **options) -> int:
        if threading.current_thread() is not threading.main_thread():
            return main(*arguments, **options)  # signals reach only the main thread
        _interruption.command, _interruption.signal_number, _interruption.watching = "", None, True
        handler = functools.partial(_on_signal, shutdown_seconds=SHUTDOWN_SECONDS)
        previous = {number: signal.signal(number, handler) for number in HANDLED_SIGNALS}
        try:
            return main(*arguments, **options)
        except BaseException:
            if _interruption.signal_number is None:
                raise
            print(interruption_message(_interruption), file=sys.stderr, flush=True)
            return _interruption.exit_status
        finally:
            if _interruption.signal_number is None:  # once stopping, further signals stay ignored until exit
                _interruption.watching = False
                for number, handler in previous.items():
                    signal.signal(number, handler)

    return wrapped
