"""The `effattn` command line: one sub-command per stage, each running a Prefect flow.

The options are generated from the stages' settings objects (flows/settings.py); `python -m flows.cli --reference`
prints them as docs/CLI.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from flows.interrupts import interrupted, name_the_command, stops_cleanly_on_signals
from flows.settings import (
    CausalSettings,
    EfficientSettings,
    ExplainSettings,
    ExtractSettings,
    InspectSettings,
    PipelineSettings,
    ReportSettings,
    ServeSettings,
    StageSettings,
    StudiesSettings,
    TrainSettings,
    UnlockSettings,
    VerifySettings,
    ViewSettings,
    cli_spelling,
    field_annotation,
    value_kind,
)

# command -> (help, the settings classes its options come from); the options are generated from their fields.
COMMANDS: dict[str, tuple[str, tuple[type[StageSettings], ...]]] = {
    "extract": ("capture attention and values of a model over a corpus into a store", (ExtractSettings,)),
    "train": ("fine-tune a classifier on a labelled corpus (cached)", (TrainSettings,)),
    "efficient": ("compute efficient attention from a store (Dask)", (EfficientSettings,)),
    "causal": (
        "re-inject attention, efficient attention and controls into the model; write results",
        (CausalSettings,),
    ),
    "explain": (
        "token attributions of attention, efficient attention and baselines; ERASER faithfulness",
        (ExplainSettings,),
    ),
    "inspect": ("print what is in a store", (InspectSettings,)),
    "report": ("write an HTML report (index.html + PNG figures) of causal results", (ReportSettings,)),
    "verify": (
        "read every chunk of a store: checksums, schema, invariants; exit status 0 when sound, 1 when "
        "damaged, 3 when incomplete (a stage has not finished), 2 when absent or unreachable",
        (VerifySettings,),
    ),
    "unlock": ("remove the writer lock of a store whose run died on another host", (UnlockSettings,)),
    "run": ("the whole pipeline: (train) -> extract -> efficient -> causal -> report", (PipelineSettings,)),
    "studies": (
        "the pipeline on the four study datasets, and one page answering the claims across them",
        (StudiesSettings,),
    ),
    "serve": ("serve the pipeline on a schedule from a Prefect server", (ServeSettings, PipelineSettings)),
    "view": ("browse a store (and its results) in a web browser: a local server, read-only", (ViewSettings,)),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _comma_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _comma_positive_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(item) for item in _comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None


# How a value of each kind (flows.settings.value_kind) is read from its command-line text.
VALUE_PARSERS = {
    "int": int,
    "positive int": _positive_int,
    "non-negative int": _non_negative_int,
    "float": float,
    "positive float": _positive_float,
    "str": str,
    "choice": str,
    "list of str": _comma_list,
    "list of positive int": _comma_positive_ints,
}


def format_default(value) -> str:
    return ",".join(str(item) for item in value) if isinstance(value, tuple) else str(value)


def option_help(field) -> str:
    """The field's description, with its default unless the description already says it (or there is none)."""
    text = field.description or ""
    if field.is_required() or field.default is None or isinstance(field.default, bool) or "default" in text:
        return text
    return f"{text} (default {format_default(field.default)})"


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class: type[StageSettings]) -> None:
    """One argparse option per field of `settings_class` (flows.settings.option says how it is spelt); the
    destination of each is the field's name."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for name, field in settings_class.model_fields.items():
        spelling = cli_spelling(field)
        if not spelling.get("cli", True):
            continue
        kind, choices = value_kind(field_annotation(settings_class, name))
        flag = spelling.get("flag") or "--" + name.replace("_", "-")
        if kind == "bool":
            if spelling.get("negation"):
                negation, negation_help = spelling["negation"]
                parser.add_argument(negation, dest=name, action="store_false", help=negation_help)
            else:
                parser.add_argument(flag, dest=name, action="store_true", help=field.description)
            continue
        keywords = {"type": VALUE_PARSERS[kind], "help": option_help(field)}
        if choices:
            keywords["choices"] = choices
        if not choices:  # choices show as {a,b}
            keywords["metavar"] = spelling.get("metavar") or flag.lstrip("-").upper().replace("-", "_")
        if spelling.get("positional"):
            parser.add_argument(name, **{**keywords, "metavar": None})
            continue
        target = parser
        if spelling.get("group"):
            if spelling["group"] not in groups:
                groups[spelling["group"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[spelling["group"]]
        elif field.is_required():
            keywords["required"] = True
        target.add_argument(flag, dest=name, default=None if field.is_required() else field.default, **keywords)
        if spelling.get("unset"):
            unset_flag, unset_help = spelling["unset"]
            parser.add_argument(unset_flag, dest=name, action="store_const", const=None, help=unset_help)


class _CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown options are reported by the sub-command they were given to
    (`effattn extract: error: unrecognized arguments: ...`, with that command's usage), not by `effattn`."""

    command_parsers: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args=None, namespace=None):
        arguments, unknown = self.parse_known_args(args, namespace)
        if unknown:
            parser = self.command_parsers.get(getattr(arguments, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return arguments


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandLineParser(prog="effattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    parser.command_parsers = commands.choices
    for command, (summary, settings_classes) in COMMANDS.items():
        command_parser = commands.add_parser(command, help=summary)
        for settings_class in settings_classes:
            add_settings_arguments(command_parser, settings_class)
    return parser


def parse_settings(argv: list[str] | None = None) -> tuple[argparse.Namespace, tuple[StageSettings, ...]]:
    """The parsed command line and the command's settings objects (in COMMANDS' order). Exits with status 2 and
    `effattn CMD: error: ...` on a bad command line."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    settings = []
    for settings_class in COMMANDS[arguments.command][1]:
        names = [name for name, field in settings_class.model_fields.items() if cli_spelling(field).get("cli", True)]
        try:
            settings.append(settings_class(**{name: getattr(arguments, name) for name in names}))
        except ValidationError as error:
            problem = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
            parser.command_parsers[arguments.command].error(problem)
    return arguments, tuple(settings)


def cli_reference() -> str:
    """docs/CLI.md: every command and its options, generated from the settings objects (a test keeps the file in
    step: `python -m flows.cli --reference > docs/CLI.md` rewrites it)."""
    lines = [
        "# Command-line reference",
        "",
        "Generated from the settings objects of `flows/settings.py` by `python -m flows.cli --reference`; "
        "`tests/test_settings.py` checks that this file is up to date. `effattn CMD --help` prints the same.",
        "",
    ]
    for command, (summary, settings_classes) in COMMANDS.items():
        lines += [f"## effattn {command}", "", summary[0].upper() + summary[1:] + ".", ""]
        lines += [f"Settings: {', '.join(f'`flows.settings.{cls.__name__}`' for cls in settings_classes)}.", ""]
        lines += ["| option | value | default | meaning |", "| --- | --- | --- | --- |"]
        for settings_class in settings_classes:
            for name, field in settings_class.model_fields.items():
                spelling = cli_spelling(field)
                if not spelling.get("cli", True):
                    continue
                kind, choices = value_kind(field_annotation(settings_class, name))
                flag = spelling.get("flag") or "--" + name.replace("_", "-")
                value = " \\| ".join(choices) if choices else kind
                if spelling.get("positional"):
                    flag, default = name.upper(), "required"
                elif field.is_required():
                    default = "required"
                elif spelling.get("group"):
                    default = f"one of the {spelling['group']} options"
                else:
                    default = "-" if field.default is None else format_default(field.default)
                if kind == "bool":
                    flag, value, text = (
                        (spelling["negation"][0], "switch", spelling["negation"][1])
                        if spelling.get("negation")
                        else (flag, "switch", field.description)
                    )
                    default = "off"
                else:
                    text = field.description
                text = (text or "").replace("<", "&lt;").replace("|", "\\|")  # markdown: not a tag, not a column
                lines.append(f"| `{flag}` | {value} | {default} | {text} |")
                if spelling.get("unset"):
                    lines.append(f"| `{spelling['unset'][0]}` | switch | off | {spelling['unset'][1]} |")
        lines.append("")
    return "\n".join(lines)


def one_line_problem(arguments: argparse.Namespace, error: BaseException) -> str | None:
    """The message of an error the CLI reports in one `effattn CMD: error: ...` line: the project's own errors
    (a bad input, a store problem: AttentionStoreError, ValueError, FileNotFoundError), a full disk or a store
    this user may not write, an unreachable or forbidden store. None for an unexpected exception, whose traceback
    is shown."""
    from storage_schemas.attention_store import AttentionStoreError

    if isinstance(error, (AttentionStoreError, ValueError, FileNotFoundError)):
        return str(error)
    if not isinstance(error, Exception):
        return None
    from storage_schemas.remote import storage_access_problem
    from storage_schemas.storage_faults import explain_storage_error

    url = getattr(arguments, "store", None) or getattr(arguments, "results", None) or "the store"
    explained = explain_storage_error(error, str(url))  # a full disk, a store this user may not write
    return str(explained) if explained is not None else storage_access_problem(str(url), error)


class _HideTracebacksOfReportedErrors(logging.Filter):
    """Drops Prefect's run-log records about an exception that the CLI reports in one line: the traceback of
    "Encountered exception during execution" / "Task run failed", and the "Finished in state Failed(...)" lines
    that repeat its message. Records about any other exception pass unchanged."""

    def __init__(self, arguments: argparse.Namespace | None = None) -> None:
        super().__init__()
        self.arguments = arguments
        self.reported: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            problem = one_line_problem(self.arguments, error)
            if problem is None:
                return True
            self.reported.append(str(error))
            return False
        message = record.getMessage()
        return not any(text and text[:80] in message for text in self.reported)


_HIDE_REPORTED_ERRORS = _HideTracebacksOfReportedErrors()


def hide_prefect_tracebacks_of_reported_errors(arguments: argparse.Namespace) -> None:
    """Install the filter `_HideTracebacksOfReportedErrors` (one, however often main runs in a process) on the
    loggers of Prefect's flow and task runs: records are filtered where they are made, so every handler sees the
    same."""
    _HIDE_REPORTED_ERRORS.arguments = arguments
    _HIDE_REPORTED_ERRORS.reported.clear()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_HIDE_REPORTED_ERRORS)  # a filter already there is not added twice


def refuse_bad_input(arguments: argparse.Namespace, settings: StageSettings) -> int | None:
    """Run the command's pre-flight checks (flows/preflight.py) on its settings, before Prefect is imported: 2
    after printing the one-line refusal, None when the command may start."""
    from flows.preflight import check_command
    from storage_schemas.remote import apply_storage_time_limits

    try:
        apply_storage_time_limits()  # a silent object store: an error after $EFFATTN_STORAGE_TIMEOUT s, not a hang
        check_command(arguments.command, settings)
    except Exception as error:
        problem = one_line_problem(arguments, error)
        if problem is None or interrupted():
            raise
        print(f"effattn {arguments.command}: error: {problem}", file=sys.stderr)
        return 2
    return None


# --- what each command runs and prints (its settings come from parse_settings) -----------------------------------
def _run_extract(settings: ExtractSettings) -> int:
    from flows.extract import extract
    from storage_schemas.inspection import describe_attention_store

    print(describe_attention_store(extract(settings)))
    return 0


def _run_train(settings: TrainSettings) -> int:
    import json
    from pathlib import Path

    from flows.train import train

    folder = train(settings)
    card = json.loads((Path(folder) / "model_card.json").read_text())
    print(f"trained model: {folder}")
    print(
        f"held-out accuracy {card['held_out_accuracy']:.3f} "
        f"(majority baseline {card['majority_baseline']['held_out_accuracy']:.3f})"
    )
    return 0


def _run_efficient(settings: EfficientSettings) -> int:
    from flows.efficient import efficient
    from storage_schemas.inspection import describe_attention_store

    print(describe_attention_store(efficient(settings)))
    return 0


def _run_causal(settings: CausalSettings) -> int:
    from analysis.claims import format_claims_table
    from flows.causal import causal

    print(format_claims_table(causal(settings)))
    print(f"results: {settings.results}")
    return 0


def _run_explain(settings: ExplainSettings) -> int:
    from analysis.claims import format_claims_table
    from flows.explain import explain

    print(format_claims_table(explain(settings)))
    print(f"results: {settings.results}")
    return 0


def _run_inspect(settings: InspectSettings) -> int:
    from storage_schemas.inspection import describe_attention_store

    print(describe_attention_store(settings.store))
    return 0


def _run_report(settings: ReportSettings) -> int:
    from flows.report import report
    from flows.view import view_command
    from storage_schemas.causal_results import open_causal_results

    print(f"report: {report(settings)}")
    store = settings.store or open_causal_results(settings.results).attrs.get("attention_store")
    if store:
        print(f"browse it: {view_command(store, settings.results, settings.explanations)}")
    return 0


def _run_verify(settings: VerifySettings) -> int:
    from storage_schemas.verification import unmark_damaged_shards
    from tasks.verification import verify_store_in_parallel

    report = verify_store_in_parallel(settings.store, dask_address=settings.dask_address, workers=settings.workers)
    print(report.text())
    if settings.repair and not report.ok:
        unmarked = unmark_damaged_shards(settings.store, report)
        for stage, shards in unmarked.items():
            print(f"marked as not done: {'extraction' if stage == 'extract' else 'efficient/' + stage} shards {shards}")
    return report.exit_status


def _run_unlock(settings: UnlockSettings) -> int:
    from storage_schemas.store_lock import break_store_lock

    removed, holder = break_store_lock(settings.store)
    if not removed:
        print(f"{settings.store} is not locked")
    else:
        print(
            f"removed the lock of {holder.describe() if holder else 'an unknown holder (unreadable record)'} "
            f"from {settings.store}"
        )
    return 0


def _run_pipeline(settings: PipelineSettings) -> int:
    from analysis.claims import format_claims_table
    from analysis.run_summary import summary_table
    from flows.pipeline import run_pipeline, stage_table

    record = run_pipeline(settings)
    print()
    print(stage_table(record))
    print()
    print("efficient attention per variant (shares of (example, layer, head) blocks):")
    print(summary_table(record["efficient_summary"]))
    print()
    print("the claims (every head of every layer replaced at once):")
    print(format_claims_table(record["claims"]))
    print()
    print(f"attention store: {record['store']}")
    print(f"causal results:  {record['results']}")
    print(f"explanations:    {record['explanations']}")
    print(f"report:          {record['report']}")
    from flows.view import view_command

    print(f"browse it:       {view_command(record['store'], record['results'], record['explanations'])}")
    return 0


def _run_studies(settings: StudiesSettings) -> int:
    from analysis.claims import format_claims_by_study
    from flows.studies import run_studies

    outcome = run_studies(settings)
    print(format_claims_by_study(outcome["claims"], list(outcome["records"])))
    print(f"claims across the studies: {outcome['index']}")
    return 0


def _run_serve(schedule: ServeSettings, pipeline: PipelineSettings) -> int:
    from flows.serve import serve_pipeline

    serve_pipeline(pipeline, schedule)
    return 0


def _run_view(settings: ViewSettings) -> int:
    from flows.view import serve_view

    serve_view(settings)
    return 0


RUNNERS = {
    "extract": _run_extract,
    "train": _run_train,
    "efficient": _run_efficient,
    "causal": _run_causal,
    "explain": _run_explain,
    "inspect": _run_inspect,
    "report": _run_report,
    "verify": _run_verify,
    "unlock": _run_unlock,
    "run": _run_pipeline,
    "studies": _run_studies,
    "serve": _run_serve,
    "view": _run_view,
}


# Commands that run flows (serve checks its server itself: it needs a real one).
FLOW_COMMANDS = ("extract", "train", "efficient", "causal", "explain", "report", "run", "studies")


@stops_cleanly_on_signals
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--reference"]:  # for docs/CLI.md; not a command
        print(cli_reference())
        return 0
    arguments, settings = parse_settings(argv)
    name_the_command(arguments.command)
    # OpenMP threads that spin while waiting make torch crawl when another process holds a core; must be set
    # before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    refused = refuse_bad_input(arguments, settings[-1])  # before anything imports Prefect or starts its server
    if refused is not None:
        return refused
    hide_prefect_tracebacks_of_reported_errors(arguments)
    from storage_schemas.attention_store import use_fast_codec_pipeline

    use_fast_codec_pipeline()  # also for the commands that run no flow (inspect, verify)

    try:
        if arguments.command in FLOW_COMMANDS:
            from flows.interrupts import quiet_prefect_console_when_interrupted, record_signals_that_prefect_handles
            from flows.prefect_server import use_prefect_api

            use_prefect_api(arguments.command)  # a generous startup limit; a dead PREFECT_API_URL reported in seconds
            quiet_prefect_console_when_interrupted()
            record_signals_that_prefect_handles()
        return RUNNERS[arguments.command](*settings)
    except Exception as error:
        problem = one_line_problem(arguments, error)
        if problem is None or interrupted():  # stops_cleanly_on_signals reports an interruption
            raise
        print(f"effattn {arguments.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
