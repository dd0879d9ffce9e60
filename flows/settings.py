"""The settings of every command, each option declared once: type, default, validation and help text.

One frozen pydantic model per command. The Prefect flows take them (`extract(ExtractSettings(...))`; Prefect
validates pydantic parameters), the command line is generated from their fields (flows/cli.py, with argparse, so
that errors keep the `effattn CMD: error: ...` form), the pre-flight checks read them (flows/preflight.py), and
the stores record what they say in the shape they always had, so that stores and results written before these
objects stay complete for a rerun of the same command (`EfficientSettings.recorded()`,
`flows.causal.recorded_causal_settings`, `flows.explain.recorded_explanation_settings`,
`PipelineSettings.extraction_shape()`). docs/CLI.md is generated from them too (`python -m flows.cli --reference`).

An option used by several commands is declared once below as an `Annotated` alias (type, default, help, flag);
a command with another default for it assigns that default in its class (e.g. `batch_size: BatchSize = 32`).
Defaults that stand for "all of a list declared elsewhere" (the registered variants, the scopes, the minimality
directions, ERASER's percents) are None here and resolved where the list lives (analysis/variants.py,
analysis/causal.py, analysis/interventions.py, analysis/explainers.py), so that this module imports neither
torch nor Prefect (the CLI parses and runs its pre-flight checks before either is imported).

Two commands hand their options to an analysis object: `effattn train` (analysis.training_settings.TrainingSettings,
built by `TrainSettings.training()`) and `effattn explain` (analysis.explainers.ExplanationSettings, built by
`ExplainSettings.explanation_settings()`). Those dataclasses are the one declaration of their options' defaults; the
fields here read them, so that a Python caller and the command line train and explain alike.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from analysis.explainers import PERCENTS, ExplanationSettings, require_known_explainers
from analysis.training_settings import TrainingSettings
from analysis.variants import VARIANTS, variant_records


def option(
    default: Any = ...,
    description: str = "",
    *,
    flag: str | None = None,
    positional: bool = False,
    negation: tuple[str, str] | None = None,
    unset: tuple[str, str] | None = None,
    group: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A settings field with its command-line spelling (read by flows/cli.py).

    flag: the option's name (default `--` + the field name with dashes); positional: an argument without a flag;
    negation: for a True-by-default switch, (flag, help) of the flag that sets it False (`--no-train`);
    unset: (flag, help) of a second flag that sets the field to None (e.g. `--all` for the limit); group: options
    of the same group are mutually exclusive, one of them required; metavar: the value's name in the help
    (default: the flag's); cli: False for a Python-only setting.
    The spelling is kept in the field's JSON schema (plain JSON values), where Prefect's parameter schema shows it.
    """
    spelling = {
        "flag": flag,
        "positional": positional,
        "negation": list(negation) if negation else None,
        "unset": list(unset) if unset else None,
        "group": group,
        "metavar": metavar,
        "cli": cli,
    }
    return Field(
        default,
        description=description,
        json_schema_extra={"cli": {key: value for key, value in spelling.items() if value or key == "cli"}},
    )


class StageSettings(BaseModel):
    """Frozen, and unknown names are refused (a misspelt setting must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


Names = tuple[str, ...]
Device = Literal["cpu", "cuda"]

# --- shared options (each declared once) -------------------------------------------------------------------------
CorpusOption = Annotated[
    str,
    option(
        description=("a bundled corpus (rt-sentiment, bbc-topic, political-party, ...) or a .csv/.jsonl/.parquet file")
    ),
]
ModelOption = Annotated[str, option(description="minilm, smollm2, or a local Hugging Face model folder")]
StoreOption = Annotated[str, option(description="path or fsspec URL of the attention store (Zarr v3)")]
MaxLength = Annotated[PositiveInt, option(128, "truncate texts to this many tokens")]
Seed = Annotated[int, option(0, "seed of the example sample and of untrained heads")]
StorageDtype = Annotated[Literal["float32", "float16"], option("float32", "storage dtype of tensors")]
Task = Annotated[
    Literal["classification", "next-token"],
    option("classification", "classification logits per example, or next-token logits per position (decoders)"),
]
TopK = Annotated[PositiveInt, option(10, "next-token logits kept per position")]
Split = Annotated[
    Literal["all", "train", "held_out"] | None,
    option(None, "corpus rows to extract (default: held_out when a head is trained here, else all)"),
]
Train = Annotated[
    bool,
    option(
        True,
        "fine-tune a classification head where the model has none",
        negation=("--no-train", "keep a random head instead of fine-tuning one (smoke tests only)"),
    ),
]
Epochs = Annotated[PositiveInt, option(TrainingSettings.default("epochs"), "epochs of the automatic fine-tuning")]
TextColumn = Annotated[str | None, option(None, "text column of a user file (default: text)")]
LabelColumn = Annotated[
    str | None, option(None, "label column of a user file (default: label if present; none: unlabelled)")
]
DeviceOption = Annotated[Device, option("cpu", "where the model runs")]
# Explained examples by default: enough for an explanation claim to be decided (analysis.explanation_claims
# MIN_TESTABLE_EXAMPLES is 20, counted over the examples where efficient attention differs from A).
EXPLAINED_EXAMPLES = 32
BatchSize = Annotated[PositiveInt, option(16, "examples per forward pass")]
ShardSize = Annotated[PositiveInt | None, option(None, "examples per shard (default: fit 256 MiB)")]
CacheRoot = Annotated[
    str | None, option(None, "cache of trained heads (default: $EFFATTN_CACHE or ~/.cache/effattn)", flag="--cache")
]
Limit = Annotated[PositiveInt | None, option(None, "use this many examples (seeded sample; default: all)")]
Variants = Annotated[
    Names | None,
    option(
        None,
        f"comma-separated efficient-attention variants: {','.join(VARIANTS)} (default: every registered one "
        "that the store's length allows, analysis/variants.py: "
        + ", ".join(
            f"{record.name} up to {record.default_max_length} positions"
            for record in variant_records()
            if record.default_max_length is not None
        )
        + ")",
    ),
]
DaskAddress = Annotated[str | None, option(None, "scheduler of an existing Dask cluster, tcp://HOST:PORT")]
Workers = Annotated[PositiveInt | None, option(None, "LocalCluster processes (default: cores)")]
# A stage that also runs in-process: on Dask only with an address or a worker count (tasks.dask_cluster).
StageWorkers = Annotated[
    PositiveInt | None,
    option(None, "run on a LocalCluster of this many processes (default: in this process, unless --dask-address)"),
]
SimplexMaxIterations = Annotated[PositiveInt, option(200, "iterations of the simplex variant's solver")]
SimplexTolerance = Annotated[PositiveFloat, option(1e-10, "convergence tolerance of the simplex variant's solver")]
Scopes = Annotated[
    Names | None, option(None, "comma-separated scopes of the causal measures: all,layer,head (default: all three)")
]
ScopeExamples = Annotated[
    PositiveInt | None,
    option(
        32,
        "examples measured one layer and one head at a time (spread over the store; in a store that grows, drawn "
        "per example by its identity, at the share this count gives when the results are created)",
        unset=("--all-scope-examples", "measure every example at the layer and head scopes too"),
    ),
]
LayerSelection = Annotated[
    str | None,
    option(
        None,
        "model layers to store, e.g. 0,3,5 or 0-2,5 (default: all); later stages work on the stored ones",
        metavar="LAYERS",
    ),
]
HeadSelection = Annotated[
    str | None,
    option(
        None,
        "attention heads to store in each stored layer, e.g. 0-3 (default: all; with grouped-query attention "
        "the same number from each kv head used)",
        metavar="HEADS",
    ),
]
MinimalityDirections = Annotated[
    tuple[PositiveInt, ...] | None,
    option(
        None,
        "directions removed by the minimality probe, comma-separated (default: 1,2,4,8,16; those < head dim)",
        flag="--minimality-k",
    ),
]


# --- one class per command ------------------------------------------------------------------------------------------
class ExtractSettings(StageSettings):
    """`effattn extract` / flows.extract.extract: corpus + model -> attention store."""

    corpus: CorpusOption
    model: ModelOption
    store: StoreOption
    max_length: MaxLength
    limit: Limit
    batch_size: BatchSize
    shard_size: ShardSize
    dtype: StorageDtype
    device: DeviceOption
    text_column: TextColumn
    label_column: LabelColumn
    seed: Seed
    task: Task
    top_k: TopK
    split: Split
    train: Train
    epochs: Epochs
    layers: LayerSelection
    heads: HeadSelection
    cache_root: CacheRoot
    dask_address: DaskAddress
    workers: StageWorkers


# The settings that shape an attention store besides corpus, model and limit (which name it): a pipeline run that
# changes any of them from its default gets its own store name, and they are part of the recorded inputs.
EXTRACTION_SHAPE = (
    "max_length",
    "seed",
    "dtype",
    "task",
    "top_k",
    "split",
    "train",
    "epochs",
    "text_column",
    "label_column",
    "layers",
    "heads",
)


class TrainSettings(StageSettings):
    """`effattn train` / flows.train.train: fine-tune a classifier (cached)."""

    corpus: Annotated[str, option(description="a labelled corpus: bundled name or file")]
    model: ModelOption = "minilm"
    epochs: Epochs
    seed: Annotated[int, option(TrainingSettings.default("seed"), "seed of the split and of every other random choice")]
    batch_size: BatchSize = TrainingSettings.default("batch_size")
    learning_rate: Annotated[
        PositiveFloat, option(TrainingSettings.default("learning_rate"), "peak AdamW learning rate")
    ]
    max_length: MaxLength = TrainingSettings.default("max_length")
    max_train_examples: Annotated[
        PositiveInt | None,
        option(
            TrainingSettings.default("max_train_examples"),
            "train on a seeded sample of at most this many examples (default: all)",
        ),
    ]
    text_column: TextColumn
    label_column: Annotated[str | None, option(None, "label column of a user file (default: label)")]
    cache_root: CacheRoot

    def training(self) -> TrainingSettings:
        """How the head is trained (analysis.training_settings.TrainingSettings): the fields of the same name; the
        others (weight decay, warmup, held-out share) keep their one default."""
        return TrainingSettings(
            **{
                field.name: getattr(self, field.name)
                for field in dataclasses.fields(TrainingSettings)
                if field.name in type(self).model_fields
            }
        )


class EfficientSettings(StageSettings):
    """`effattn efficient` / flows.efficient.efficient: attention store -> efficient attention (Dask)."""

    store: StoreOption
    variants: Variants
    dask_address: DaskAddress
    workers: Workers
    simplex_max_iterations: SimplexMaxIterations
    simplex_tolerance: SimplexTolerance

    def recorded(self) -> dict[str, Any]:
        """What the store records of these settings (attribute `settings` of efficient/<variant>): the ones that
        shape the numbers. The same shape as before the settings objects, so older stores are not recomputed."""
        return {
            "simplex_max_iterations": int(self.simplex_max_iterations),
            "simplex_tolerance": float(self.simplex_tolerance),
        }


class CausalSettings(StageSettings):
    """`effattn causal` / flows.causal.causal: re-inject attention, efficient attention and controls."""

    store: Annotated[str, option(description="attention store with efficient attention (path or URL)")]
    results: Annotated[str, option(description="results dataset to write (Zarr v3; path or URL)")]
    interventions: Annotated[
        Names | None,
        option(
            None,
            "comma-separated, e.g. replay,efficient:effective,null:simplex,ablate,minimality:effective:k=4 "
            "(default: every one for the chosen variants)",
        ),
    ]
    variants: Annotated[
        Names | None, option(None, "variants of the default interventions (default: those finished in the store)")
    ]
    scopes: Scopes
    layer_interventions: Annotated[
        Names | None,
        option(None, "interventions also run one layer at a time (default: efficient, null, uniform, ablate)"),
    ]
    head_interventions: Annotated[
        Names | None, option(None, "interventions also run one head at a time (default: ablate)")
    ]
    scope_examples: ScopeExamples
    minimality_directions: MinimalityDirections
    seed: Annotated[int, option(0, "seed of the random noise interventions")]
    model: Annotated[str | None, option(None, "the model, if it moved since extraction (same weights)")]
    device: DeviceOption
    batch_size: BatchSize
    forward_rows: Annotated[
        PositiveInt | None,
        option(
            None,
            "rows of one intervened forward pass up to 128 positions; longer passes take fewer, keeping rows x "
            "length² (analysis.causal.rows_per_pass; default 64; 8 for next-token stores)",
            cli=False,
        ),
    ]
    dask_address: DaskAddress
    workers: StageWorkers


class ExplainSettings(StageSettings):
    """`effattn explain` / flows.explain.explain: token attributions and their ERASER faithfulness."""

    store: Annotated[str, option(description="attention store (with efficient attention; path or URL)")]
    results: Annotated[str, option(description="explanation results to write (Zarr v3; path or URL)")]
    methods: Annotated[
        Names | None,
        option(
            None,
            "comma-separated, e.g. attention:rollout,simplex:last-layer,attention-norm:rollout,"
            "integrated-gradients,leave-one-out,conservative-lrp,random (default: attention and every variant the "
            "store holds, in every aggregation, and their norm-based twins, the model baselines, random)",
        ),
    ]
    examples: Annotated[
        PositiveInt | None,
        option(
            EXPLAINED_EXAMPLES,
            "examples explained, drawn (seeded) from those where efficient attention differs from A (in a store that "
            "grows, per example by its identity, at the share this count gives when the results are created)",
            unset=("--all-examples", "explain every example where efficient attention differs from A"),
        ),
    ]
    integrated_gradients_steps: Annotated[
        PositiveInt,
        option(
            ExplanationSettings.default("integrated_gradients_steps"), "integrated gradients steps", flag="--ig-steps"
        ),
    ]
    leave_one_out_max_tokens: Annotated[
        PositiveInt,
        option(
            ExplanationSettings.default("leave_one_out_max_tokens"),
            "leave-one-out only for examples with at most this many removable tokens",
            flag="--loo-max-tokens",
        ),
    ]
    minimality_rows: Annotated[
        NonNegativeInt,
        option(ExplanationSettings.default("minimality_rows"), "simplex rows tested per example and layer (0: none)"),
    ]
    seed: Annotated[int, option(ExplanationSettings.default("seed"), "seed of the random ranking and the row sample")]
    model: Annotated[str | None, option(None, "the model, if it moved since extraction (same weights)")]
    device: DeviceOption
    dask_address: DaskAddress
    workers: StageWorkers
    percents: Annotated[
        tuple[PositiveInt, ...] | None,
        option(None, "ERASER's bins: percent of the tokens removed (default: analysis.explainers.PERCENTS)", cli=False),
    ]
    minimality_tolerance: Annotated[
        PositiveFloat,
        option(
            ExplanationSettings.default("minimality_tolerance"),
            "tolerance of the simplex rows' minimality test",
            cli=False,
        ),
    ]
    shard_size: Annotated[
        PositiveInt, option(ExplanationSettings.default("shard_size"), "examples per shard of the results", cli=False)
    ]
    forward_rows: Annotated[PositiveInt, option(64, "rows of one removal forward pass", cli=False)]

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: Names | None) -> Names | None:
        """An unknown method is refused when the command line is parsed, with the names that exist."""
        if methods is not None:
            require_known_explainers(methods)
        return methods

    def explanation_settings(self, methods: Sequence[str], examples: Sequence[int]) -> ExplanationSettings:
        """The analysis options of this run (analysis.explainers.ExplanationSettings): the fields of the same name,
        with the methods and the store indices of the explained examples resolved."""
        shared = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(ExplanationSettings)
            if field.name not in ("methods", "examples", "percents")
        }
        return ExplanationSettings(
            methods=tuple(methods),
            examples=tuple(examples),
            percents=PERCENTS if self.percents is None else tuple(self.percents),
            **shared,
        )


class ReportSettings(StageSettings):
    """`effattn report` / flows.report.report: causal results -> index.html and PNG figures."""

    results: Annotated[str, option(description="path or fsspec URL of the causal results (effattn causal)")]
    out: Annotated[str, option(description="local folder for index.html and the figures (created)")]
    store: Annotated[
        str | None, option(None, "the attention store of the results (default: the one recorded in the results)")
    ]
    examples: Annotated[PositiveInt, option(3, "examples drawn as heatmaps")]
    explanations: Annotated[str | None, option(None, "explanation results to show too (effattn explain)")]


class InspectSettings(StageSettings):
    """`effattn inspect`: print what is in a store."""

    store: Annotated[str, option(description="path or fsspec URL of the store", positional=True)]


class VerifySettings(StageSettings):
    """`effattn verify`: read every chunk of a store."""

    store: Annotated[str, option(description="path or fsspec URL of the store", positional=True)]
    repair: Annotated[
        bool, option(False, "mark the damaged shards as not done, so that rerunning the stage rewrites them")
    ]
    # the shards are checked in parallel (tasks.verification); a store of one shard in this process
    dask_address: DaskAddress
    workers: Workers


class UnlockSettings(StageSettings):
    """`effattn unlock`: remove the writer lock of a store whose run died on another host."""

    store: Annotated[str, option(description="path or fsspec URL of the store", positional=True)]


class ViewSettings(StageSettings):
    """`effattn view` / flows.view.serve_view: browse a store in a web browser, served read-only."""

    store: Annotated[str, option(description="path or fsspec URL of the attention store", positional=True)]
    results: Annotated[str | None, option(None, "causal results of the store (effattn causal): claims and outcomes")]
    explanations: Annotated[
        str | None, option(None, "explanation results of the store (effattn explain): token attributions")
    ]
    host: Annotated[
        str,
        option(
            "127.0.0.1",
            "address to listen on (another than loopback prints a warning: anyone "
            "who can reach the port reads the store)",
        ),
    ]
    port: Annotated[PositiveInt, option(8050, "port to listen on")]


class PipelineSettings(StageSettings):
    """`effattn run` / flows.pipeline.run_pipeline: (train) -> extract -> efficient -> causal -> report.

    The extraction options mean what they mean in ExtractSettings, the efficient ones what they mean in
    EfficientSettings; scope_examples, scopes and minimality_directions are CausalSettings'.
    """

    corpus: CorpusOption = "rt-sentiment"
    model: ModelOption = "minilm"
    limit: Annotated[PositiveInt | None, option(300, "examples to extract", unset=("--all", "extract every example"))]
    run_dir: Annotated[str, option("runs", "folder of the outputs")]
    store: Annotated[str | None, option(None, "attention store (default <run-dir>/<corpus>-<model>-<limit>.zarr)")]
    results: Annotated[str | None, option(None, "causal results (default <run-dir>/<name>.results.zarr)")]
    report_dir: Annotated[str | None, option(None, "report folder (default <run-dir>/<name>-report)")]
    max_length: MaxLength
    seed: Seed
    dtype: StorageDtype
    task: Task
    top_k: TopK
    split: Split
    train: Train
    epochs: Epochs
    text_column: TextColumn
    label_column: LabelColumn
    layers: LayerSelection
    heads: HeadSelection
    device: DeviceOption
    batch_size: BatchSize
    shard_size: ShardSize
    variants: Variants
    dask_address: DaskAddress
    workers: Workers
    simplex_max_iterations: SimplexMaxIterations
    simplex_tolerance: SimplexTolerance
    cache_root: CacheRoot
    scope_examples: ScopeExamples
    scopes: Scopes
    minimality_directions: MinimalityDirections
    retrain: Annotated[
        bool,
        option(
            False,
            "a corpus that grows: train a new head on it as it is now and start a new store (the next generation, "
            "<name>-g2, ...); later runs append to that one. Without it, a store keeps the model it was made with",
        ),
    ]
    explain_examples: Annotated[
        NonNegativeInt,
        option(
            EXPLAINED_EXAMPLES,
            "examples explained by the explanation stage, drawn from those where efficient attention "
            "differs from A (0: skip it)",
        ),
    ]

    def extraction_shape(self) -> dict[str, Any]:
        """The settings of EXTRACTION_SHAPE: name -> value."""
        return {name: getattr(self, name) for name in EXTRACTION_SHAPE}

    @classmethod
    def extraction_shape_defaults(cls) -> dict[str, Any]:
        """The default of every EXTRACTION_SHAPE setting."""
        return {name: cls.model_fields[name].default for name in EXTRACTION_SHAPE}

    def non_default_extraction_shape(self) -> dict[str, Any]:
        """The EXTRACTION_SHAPE settings that differ from their defaults (they name the store: run_name)."""
        defaults = self.extraction_shape_defaults()
        return {name: value for name, value in self.extraction_shape().items() if value != defaults[name]}

    def _shared_with(self, stage: type[StageSettings], **given: Any) -> dict[str, Any]:
        """The fields of `stage` that this class has too (same name, same meaning), with `given` instead."""
        own = type(self).model_fields
        return {**{name: getattr(self, name) for name in stage.model_fields if name in own}, **given}

    def extract_settings(self, store: str, model: str, split: str | None) -> ExtractSettings:
        """The extraction of this run into `store` with `model` (a trained one, possibly) and `split`."""
        return ExtractSettings(**self._shared_with(ExtractSettings, store=store, model=model, split=split))

    def efficient_settings(self, store: str, variants: Names) -> EfficientSettings:
        return EfficientSettings(**self._shared_with(EfficientSettings, store=store, variants=variants))

    def explain_settings(self, store: str, results: str, methods: Names) -> ExplainSettings:
        """The explanation of `explain_examples` examples with `methods` (the causal stage's device and cluster)."""
        return ExplainSettings(
            store=store,
            results=results,
            methods=methods,
            examples=self.explain_examples,
            device=self.device,
            dask_address=self.dask_address,
            workers=self.workers,
        )

    def causal_settings(self, store: str, results: str, variants: Names) -> CausalSettings:
        # `seed` here is the extraction's and `model` the base model: the causal stage keeps its own defaults
        # (noise seed 0, the model recorded in the store)
        return CausalSettings(
            **self._shared_with(
                CausalSettings,
                store=store,
                results=results,
                variants=variants,
                seed=CausalSettings.model_fields["seed"].default,
                model=None,
            )
        )


class StudiesSettings(StageSettings):
    """`effattn studies` / flows.studies.run_studies: the pipeline on the study datasets, one page of claims."""

    studies: Annotated[
        Names | None,
        option(
            None,
            "comma-separated (default: all four, rt-sentiment,bbc-topic,political-party,next-token; see "
            "analysis/studies.py)",
        ),
    ]
    limit: Annotated[PositiveInt | None, option(100, "held-out examples per study")]
    run_dir: Annotated[str, option("runs/studies", "folder of the outputs")]
    scope_examples: ScopeExamples = 16
    next_token_limit: Annotated[
        PositiveInt, option(32, "examples of the decoder study (each costs 30 layers x 9 heads x 128^2)")
    ]
    next_token_variants: Annotated[
        Names, option(("effective", "stochastic"), "variants of the decoder study (simplex is slow there)")
    ]
    explain_examples: Annotated[
        PositiveInt,
        option(
            200,
            "examples explained per study, drawn from those where efficient attention differs from A (all of them "
            "when fewer exist)",
        ),
    ]
    workers: Workers
    cache_root: CacheRoot


class ServeSettings(StageSettings):
    """`effattn serve`'s own options (the schedule); the pipeline's are PipelineSettings."""

    cron: Annotated[str | None, option(None, 'cron schedule, e.g. "0 3 * * *" (03:00 every day)', group="schedule")]
    # a plain float: flows.serve refuses a non-positive interval with its own message
    interval: Annotated[float | None, option(None, "seconds between runs", group="schedule")]
    name: Annotated[str, option("effattn-scheduled", "deployment name")]


# --- how a field reads from the command line (used by flows/cli.py and the generated reference) -------------------
def cli_spelling(field: Any) -> dict[str, Any]:
    """The `option(...)` spelling of a pydantic FieldInfo ({} for a field declared without option)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return dict(extra.get("cli", {"cli": True}))


def value_kind(annotation: Any) -> tuple[str, tuple[Any, ...]]:
    """(kind, choices) of a field's annotation without None: kind is one of "bool", "int", "positive int",
    "non-negative int", "float", "positive float", "str", "choice" (choices given), "list of str", "list of positive
    int"."""
    arguments = [item for item in typing.get_args(annotation) if item is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return value_kind(arguments[0])
    if origin is Annotated:
        base, *metadata = typing.get_args(annotation)
        kind, choices = value_kind(base)
        if any(getattr(item, "gt", None) == 0 for item in metadata):
            kind = f"positive {kind}"
        elif any(getattr(item, "ge", None) == 0 for item in metadata):
            kind = f"non-negative {kind}"
        return kind, choices
    if origin is Literal:
        return "choice", typing.get_args(annotation)
    if origin is tuple:
        item_kind, _ = value_kind(typing.get_args(annotation)[0])
        return f"list of {item_kind}", ()
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation], ()


def field_annotation(settings_class: type[StageSettings], name: str) -> Any:
    """The full annotation of a field, its constraints (PositiveInt's gt=0) included."""
    field = settings_class.model_fields[name]
    if field.metadata:
        return Annotated[(field.annotation, *field.metadata)]
    return field.annotation
