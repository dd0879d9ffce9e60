"""The `effattn` command line: one sub-command per stage, each running a Prefect flow."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from analysis.variants import VARIANTS
from flows.interrupts import name_the_command, stops_cleanly_on_signals


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _comma_list(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']; None stays None (the option was not given)."""
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `effattn run` and `effattn serve`: those of flows.pipeline.run_pipeline."""
    parser.add_argument("--corpus", default="rt-sentiment", help="rt-sentiment (default), bbc-topic, ... or a file")
    parser.add_argument("--model", default="minilm", help="minilm (default), smollm2, or a local model folder")
    parser.add_argument("--limit", type=_positive_int, default=300, help="examples to extract (default 300)")
    parser.add_argument("--all", dest="limit", action="store_const", const=None, help="extract every example")
    parser.add_argument("--run-dir", default="runs", help="folder of the outputs (default runs/)")
    parser.add_argument("--store", default=None, help="attention store (default <run-dir>/<corpus>-<model>-<limit>.zarr)")
    parser.add_argument("--results", default=None, help="causal results (default <run-dir>/<name>.results.zarr)")
    parser.add_argument("--report-dir", default=None, help="report folder (default <run-dir>/<name>-report)")
    parser.add_argument("--max-length", type=_positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--task", choices=["classification", "next-token"], default="classification")
    parser.add_argument("--top-k", type=_positive_int, default=10)
    parser.add_argument("--split", choices=["all", "train", "held_out"], default=None)
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="keep a random head instead of fine-tuning one (smoke tests only)")
    parser.add_argument("--epochs", type=_positive_int, default=1)
    parser.add_argument("--text-column", default=None)
    parser.add_argument("--label-column", default=None, help="label column of a user file (none: unlabelled)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--shard-size", type=_positive_int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)}")
    parser.add_argument("--dask-address", default=None)
    parser.add_argument("--workers", type=_positive_int, default=None)
    parser.add_argument("--simplex-max-iterations", type=_positive_int, default=200)
    parser.add_argument("--simplex-tolerance", type=float, default=1e-10)
    parser.add_argument("--cache", dest="cache_root", default=None, help="training cache (default $EFFATTN_CACHE)")
    parser.add_argument("--scope-examples", type=_positive_int, default=32,
                        help="examples measured one layer and one head at a time by the causal stage (default 32)")
    parser.add_argument("--explain-examples", type=int, default=2,
                        help="examples explained by the explanation stage (default 2; 0: skip it)")


def _pipeline_parameters(arguments: argparse.Namespace) -> dict:
    """The keyword arguments of flows.pipeline.run_pipeline from parsed `run` / `serve` options."""
    names = ("corpus", "model", "limit", "run_dir", "store", "results", "report_dir", "max_length", "seed", "dtype",
             "task", "top_k", "split", "train", "epochs", "text_column", "label_column", "device", "batch_size",
             "shard_size", "dask_address", "workers", "simplex_max_iterations", "simplex_tolerance", "cache_root",
             "scope_examples", "explain_examples")
    parameters = {name: getattr(arguments, name) for name in names}
    parameters["variants"] = _comma_list(arguments.variants)
    return parameters


class _CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown options are reported by the sub-command they were given to
    (`effattn extract: error: unrecognized arguments: ...`, with that command's usage), not by `effattn`."""

    command_parsers: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001 - argparse's signature
        arguments, unknown = self.parse_known_args(args, namespace)
        if unknown:
            parser = self.command_parsers.get(getattr(arguments, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return arguments


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandLineParser(prog="effattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    parser.command_parsers = commands.choices

    extract = commands.add_parser("extract", help="capture attention and values of a model over a corpus into a store")
    extract.add_argument("--corpus", required=True, help="rt-sentiment, bbc-topic, or a .csv/.jsonl/.parquet file")
    extract.add_argument("--model", required=True, help="minilm, smollm2, or a local Hugging Face model folder")
    extract.add_argument("--store", required=True, help="path or fsspec URL of the attention store (Zarr v3)")
    extract.add_argument("--max-length", type=_positive_int, default=128, help="truncate texts to this many tokens")
    extract.add_argument("--limit", type=_positive_int, default=None, help="use this many examples (seeded sample)")
    extract.add_argument("--batch-size", type=_positive_int, default=16)
    extract.add_argument("--shard-size", type=_positive_int, default=None, help="examples per shard (default: fit 256 MiB)")
    extract.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype of tensors")
    extract.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    extract.add_argument("--text-column", default=None, help="text column of a user file (default: text)")
    extract.add_argument("--label-column", default=None,
                         help="label column of a user file (default: label if present; none: unlabelled)")
    extract.add_argument("--seed", type=int, default=0, help="seed of the example sample and of untrained heads")
    extract.add_argument("--task", choices=["classification", "next-token"], default="classification",
                         help="classification logits per example, or next-token logits per position (decoders)")
    extract.add_argument("--top-k", type=_positive_int, default=10, help="next-token logits kept per position")
    extract.add_argument("--split", choices=["all", "train", "held_out"], default=None,
                         help="corpus rows to extract (default: held_out when a head is trained here, else all)")
    extract.add_argument("--no-train", dest="train", action="store_false",
                         help="keep a random head instead of fine-tuning one (smoke tests only)")
    extract.add_argument("--epochs", type=_positive_int, default=1, help="epochs of the automatic fine-tuning")

    train = commands.add_parser("train", help="fine-tune a classifier on a labelled corpus (cached)")
    train.add_argument("--corpus", required=True, help="a labelled corpus: bundled name or file")
    train.add_argument("--model", default="minilm", help="base model: minilm or a local folder")
    train.add_argument("--epochs", type=_positive_int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--learning-rate", type=float, default=5e-5)
    train.add_argument("--max-length", type=_positive_int, default=128)
    train.add_argument("--max-train-examples", type=_positive_int, default=None)
    train.add_argument("--text-column", default=None)
    train.add_argument("--label-column", default=None, help="label column of a user file (default: label)")
    train.add_argument("--cache", default=None, help="cache folder (default: $EFFATTN_CACHE or ~/.cache/effattn)")

    efficient = commands.add_parser("efficient", help="compute efficient attention from a store (Dask)")
    efficient.add_argument("--store", required=True, help="path or fsspec URL of an attention store")
    efficient.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)}"
    )
    efficient.add_argument("--dask-address", default=None, help="scheduler of an existing cluster, tcp://HOST:PORT")
    efficient.add_argument("--workers", type=_positive_int, default=None, help="LocalCluster processes (default: cores)")
    efficient.add_argument("--simplex-max-iterations", type=_positive_int, default=200)
    efficient.add_argument("--simplex-tolerance", type=float, default=1e-10)

    causal = commands.add_parser(
        "causal", help="re-inject attention, efficient attention and controls into the model; write results"
    )
    causal.add_argument("--store", required=True, help="attention store with efficient attention (path or URL)")
    causal.add_argument("--results", required=True, help="results dataset to write (Zarr v3; path or URL)")
    causal.add_argument("--interventions", default=None,
                        help="comma-separated, e.g. replay,efficient:effective,null:simplex,ablate,"
                             "minimality:effective:k=4 (default: every one for the chosen variants)")
    causal.add_argument("--variants", default=None, help="variants of the default interventions (default: those in "
                                                          "the store)")
    causal.add_argument("--scopes", default="all,layer,head", help="comma-separated: all,layer,head")
    causal.add_argument("--layer-interventions", default=None,
                        help="interventions also run one layer at a time (default: efficient, null, uniform, ablate)")
    causal.add_argument("--head-interventions", default=None,
                        help="interventions also run one head at a time (default: ablate)")
    causal.add_argument("--scope-examples", type=_positive_int, default=32,
                        help="examples (spread over the store) measured at the layer and head scopes (default 32)")
    causal.add_argument("--all-scope-examples", dest="scope_examples", action="store_const", const=None,
                        help="measure every example at the layer and head scopes too")
    causal.add_argument("--minimality-k", default="1,2,4,8,16",
                        help="directions removed by the minimality probe (default 1,2,4,8,16; those < head dim)")
    causal.add_argument("--seed", type=int, default=0, help="seed of the random noise interventions")
    causal.add_argument("--model", default=None, help="the model, if it moved since extraction (same weights)")
    causal.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    causal.add_argument("--batch-size", type=_positive_int, default=16)

    inspect = commands.add_parser("inspect", help="print what is in a store")
    inspect.add_argument("store", help="path or fsspec URL of the store")

    report = commands.add_parser("report", help="write an HTML report (index.html + PNG figures) of causal results")
    report.add_argument("--results", required=True, help="path or fsspec URL of the causal results (effattn causal)")
    report.add_argument("--out", required=True, help="local folder for index.html and the figures (created)")
    report.add_argument("--store", default=None,
                        help="the attention store of the results (default: the one recorded in the results)")
    report.add_argument("--examples", type=_positive_int, default=3, help="examples drawn as heatmaps (default 3)")
    report.add_argument("--explanations", default=None, help="explanation results to show too (effattn explain)")

    verify = commands.add_parser(
        "verify", help="read every chunk of a store: checksums, schema, invariants; exit status 1 when damaged"
    )
    verify.add_argument("store", help="path or fsspec URL of the store")
    verify.add_argument("--repair", action="store_true",
                        help="mark the damaged shards as not done, so that rerunning the stage rewrites them")

    unlock = commands.add_parser("unlock", help="remove the writer lock of a store whose run died on another host")
    unlock.add_argument("store", help="path or fsspec URL of the store")

    run = commands.add_parser("run", help="the whole pipeline: (train) -> extract -> efficient -> causal -> report")
    _add_pipeline_arguments(run)

    studies = commands.add_parser(
        "studies", help="the pipeline on the four study datasets, and one page answering the claims across them"
    )
    studies.add_argument("--studies", default="rt-sentiment,bbc-topic,political-party,next-token",
                         help="comma-separated (default: all four; see analysis/studies.py)")
    studies.add_argument("--limit", type=_positive_int, default=100, help="held-out examples per study (default 100)")
    studies.add_argument("--run-dir", default="runs/studies", help="folder of the outputs (default runs/studies)")
    studies.add_argument("--scope-examples", type=_positive_int, default=16,
                         help="examples measured one layer and one head at a time (default 16)")
    studies.add_argument("--next-token-limit", type=_positive_int, default=32,
                         help="examples of the decoder study (default 32: each costs 30 layers x 9 heads x 128^2)")
    studies.add_argument("--next-token-variants", default="effective,stochastic",
                         help="variants of the decoder study (default effective,stochastic: simplex is slow there)")
    studies.add_argument("--workers", type=_positive_int, default=None)
    studies.add_argument("--cache", dest="cache_root", default=None, help="training cache (default $EFFATTN_CACHE)")

    serve = commands.add_parser("serve", help="serve the pipeline on a schedule from a Prefect server")
    schedule = serve.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--cron", default=None, help='cron schedule, e.g. "0 3 * * *" (03:00 every day)')
    schedule.add_argument("--interval", type=float, default=None, help="seconds between runs")
    serve.add_argument("--name", default="effattn-scheduled", help="deployment name (default effattn-scheduled)")
    _add_pipeline_arguments(serve)

    # --- effattn explain ---
    explain = commands.add_parser(
        "explain", help="token attributions of attention, efficient attention and baselines; ERASER faithfulness"
    )
    explain.add_argument("--store", required=True, help="attention store (with efficient attention; path or URL)")
    explain.add_argument("--results", required=True, help="explanation results to write (Zarr v3; path or URL)")
    explain.add_argument("--methods", default=None,
                         help="comma-separated, e.g. attention:rollout,simplex:last-layer,integrated-gradients,"
                              "leave-one-out,random (default: attention and every variant the store holds, in every "
                              "aggregation, the model baselines, random)")
    explain.add_argument("--examples", type=_positive_int, default=16,
                         help="examples explained, spread over the store (default 16)")
    explain.add_argument("--all-examples", dest="examples", action="store_const", const=None,
                         help="explain every example of the store")
    explain.add_argument("--ig-steps", type=_positive_int, default=32, help="integrated gradients steps (default 32)")
    explain.add_argument("--loo-max-tokens", type=_positive_int, default=128,
                         help="leave-one-out only for examples with at most this many removable tokens (default 128)")
    explain.add_argument("--minimality-rows", type=int, default=8,
                         help="simplex rows tested per example and layer (default 8; 0: none)")
    explain.add_argument("--seed", type=int, default=0, help="seed of the random ranking and the row sample")
    explain.add_argument("--model", default=None, help="the model, if it moved since extraction (same weights)")
    explain.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser


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


def refuse_bad_input(arguments: argparse.Namespace) -> int | None:
    """Run the command's pre-flight checks (flows/preflight.py), before Prefect is imported: 2 after printing
    the one-line refusal, None when the command may start."""
    from flows.preflight import check_command

    try:
        check_command(arguments.command, vars(arguments))
    except Exception as error:  # noqa: BLE001 - reported in one line when it is a known problem, else re-raised
        problem = one_line_problem(arguments, error)
        if problem is None:
            raise
        print(f"effattn {arguments.command}: error: {problem}", file=sys.stderr)
        return 2
    return None


# Commands that run flows (serve checks its server itself: it needs a real one).
FLOW_COMMANDS = ("extract", "train", "efficient", "causal", "explain", "report", "run", "studies")


@stops_cleanly_on_signals
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    name_the_command(arguments.command)
    # OpenMP threads that spin while waiting make torch crawl when another process holds a core; must be set
    # before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    refused = refuse_bad_input(arguments)  # before anything imports Prefect or starts its server
    if refused is not None:
        return refused
    hide_prefect_tracebacks_of_reported_errors(arguments)
    from storage_schemas.attention_store import use_chunk_codec_batches

    use_chunk_codec_batches()  # also for the commands that run no flow (inspect, verify)

    try:
        if arguments.command in FLOW_COMMANDS:
            from flows.interrupts import quiet_prefect_console_when_interrupted
            from flows.prefect_server import use_prefect_api

            use_prefect_api(arguments.command)  # a generous startup limit; a dead PREFECT_API_URL reported in seconds
            quiet_prefect_console_when_interrupted()
        if arguments.command == "extract":
            from flows.extract import extract
            from storage_schemas.inspection import describe_attention_store

            store = extract(
                corpus=arguments.corpus,
                model=arguments.model,
                store=arguments.store,
                max_length=arguments.max_length,
                limit=arguments.limit,
                batch_size=arguments.batch_size,
                dtype=arguments.dtype,
                device=arguments.device,
                text_column=arguments.text_column,
                label_column=arguments.label_column,
                shard_size=arguments.shard_size,
                seed=arguments.seed,
                task=arguments.task,
                top_k=arguments.top_k,
                split=arguments.split,
                train=arguments.train,
                epochs=arguments.epochs,
            )
            print(describe_attention_store(store))
        elif arguments.command == "train":
            import json
            from pathlib import Path

            from flows.train import train

            folder = train(
                corpus=arguments.corpus, model=arguments.model, epochs=arguments.epochs, seed=arguments.seed,
                batch_size=arguments.batch_size, learning_rate=arguments.learning_rate,
                max_length=arguments.max_length, max_train_examples=arguments.max_train_examples,
                text_column=arguments.text_column, label_column=arguments.label_column, cache_root=arguments.cache,
            )
            card = json.loads((Path(folder) / "model_card.json").read_text())
            print(f"trained model: {folder}")
            print(f"held-out accuracy {card['held_out_accuracy']:.3f} "
                  f"(majority baseline {card['majority_baseline']['held_out_accuracy']:.3f})")
        elif arguments.command == "efficient":
            from flows.efficient import efficient
            from storage_schemas.inspection import describe_attention_store

            store = efficient(
                store=arguments.store,
                variants=_comma_list(arguments.variants),
                dask_address=arguments.dask_address,
                workers=arguments.workers,
                simplex_max_iterations=arguments.simplex_max_iterations,
                simplex_tolerance=arguments.simplex_tolerance,
            )
            print(describe_attention_store(store))
        elif arguments.command == "causal":
            from analysis.claims import format_claims_table
            from flows.causal import causal

            claims = causal(
                store=arguments.store,
                results=arguments.results,
                interventions=_comma_list(arguments.interventions),
                variants=_comma_list(arguments.variants),
                scopes=_comma_list(arguments.scopes),
                layer_interventions=_comma_list(arguments.layer_interventions),
                head_interventions=_comma_list(arguments.head_interventions),
                scope_examples=arguments.scope_examples,
                minimality_directions=[int(k) for k in _comma_list(arguments.minimality_k)],
                seed=arguments.seed,
                model=arguments.model,
                device=arguments.device,
                batch_size=arguments.batch_size,
            )
            print(format_claims_table(claims))
            print(f"results: {arguments.results}")
        elif arguments.command == "inspect":
            from storage_schemas.inspection import describe_attention_store

            print(describe_attention_store(arguments.store))
        elif arguments.command == "report":
            from flows.report import report

            index = report(results=arguments.results, out=arguments.out, store=arguments.store,
                           examples=arguments.examples, explanations=arguments.explanations)
            print(f"report: {index}")
        elif arguments.command == "verify":
            from storage_schemas.verification import unmark_damaged_shards, verify_store

            report = verify_store(arguments.store)
            print(report.text())
            if arguments.repair and not report.ok:
                unmarked = unmark_damaged_shards(arguments.store, report)
                for stage, shards in unmarked.items():
                    print(f"marked as not done: {'extraction' if stage == 'extract' else 'efficient/' + stage} "
                          f"shards {shards}")
            if not report.ok:
                return 1
        elif arguments.command == "unlock":
            from storage_schemas.store_lock import break_store_lock

            removed, holder = break_store_lock(arguments.store)
            if not removed:
                print(f"{arguments.store} is not locked")
            else:
                print(f"removed the lock of {holder.describe() if holder else 'an unknown holder (unreadable record)'} "
                      f"from {arguments.store}")
        elif arguments.command == "run":
            from analysis.claims import format_claims_table
            from analysis.run_summary import summary_table
            from flows.pipeline import run_pipeline, stage_table

            record = run_pipeline(**_pipeline_parameters(arguments))
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
        elif arguments.command == "studies":
            from analysis.claims import format_claims_by_study
            from flows.studies import run_studies

            names = _comma_list(arguments.studies)
            outcome = run_studies(
                studies=names, limit=arguments.limit, run_dir=arguments.run_dir,
                variants_of={"next-token": _comma_list(arguments.next_token_variants)},
                limit_of={"next-token": arguments.next_token_limit},
                scope_examples=arguments.scope_examples, workers=arguments.workers, cache_root=arguments.cache_root,
            )
            print(format_claims_by_study(outcome["claims"], names))
            print(f"claims across the studies: {outcome['index']}")
        elif arguments.command == "serve":
            from flows.serve import serve_pipeline

            serve_pipeline(_pipeline_parameters(arguments), cron=arguments.cron, interval=arguments.interval,
                           name=arguments.name)
        elif arguments.command == "explain":
            from analysis.claims import format_claims_table
            from flows.explain import explain

            claims = explain(store=arguments.store, results=arguments.results, methods=_comma_list(arguments.methods),
                             examples=arguments.examples, integrated_gradients_steps=arguments.ig_steps,
                             leave_one_out_max_tokens=arguments.loo_max_tokens,
                             minimality_rows=arguments.minimality_rows, seed=arguments.seed, model=arguments.model,
                             device=arguments.device)
            print(format_claims_table(claims))
            print(f"results: {arguments.results}")
    except Exception as error:  # noqa: BLE001 - reported in one line when it is a known problem, else re-raised
        problem = one_line_problem(arguments, error)
        if problem is None:
            raise
        print(f"effattn {arguments.command}: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
