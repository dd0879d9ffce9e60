"""The `effattn` command line: one sub-command per stage, each running a Prefect flow."""

from __future__ import annotations

import argparse
import os
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
    extract.add_argument("--label-column", default=None, help="label column of a user file (default: label if present)")
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
    train.add_argument("--label-column", default=None)
    train.add_argument("--cache", default=None, help="cache folder (default: $EFFATTN_CACHE or ~/.cache/effattn)")

    efficient = commands.add_parser("efficient", help="compute efficient attention from a store (Dask)")
    efficient.add_argument("--store", required=True, help="path or fsspec URL of an attention store")
    efficient.add_argument(
        "--variants", default="effective,stochastic,simplex", help="comma-separated: effective,stochastic,simplex"
    )
    efficient.add_argument("--dask-address", default=None, help="scheduler of an existing cluster, tcp://HOST:PORT")
    efficient.add_argument("--workers", type=_positive_int, default=None, help="LocalCluster processes (default: cores)")
    efficient.add_argument("--simplex-max-iterations", type=_positive_int, default=200)
    efficient.add_argument("--simplex-tolerance", type=float, default=1e-10)

    inspect = commands.add_parser("inspect", help="print what is in a store")
    inspect.add_argument("store", help="path or fsspec URL of the store")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    # OpenMP threads that spin while waiting make torch crawl when another process holds a core; must be set
    # before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from storage_schemas.attention_store import AttentionStoreError

    try:
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
                variants=[variant.strip() for variant in arguments.variants.split(",") if variant.strip()],
                dask_address=arguments.dask_address,
                workers=arguments.workers,
                simplex_max_iterations=arguments.simplex_max_iterations,
                simplex_tolerance=arguments.simplex_tolerance,
            )
            print(describe_attention_store(store))
        elif arguments.command == "inspect":
            from storage_schemas.inspection import describe_attention_store

            print(describe_attention_store(arguments.store))
    except (AttentionStoreError, ValueError, FileNotFoundError) as error:
        print(f"effattn {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
