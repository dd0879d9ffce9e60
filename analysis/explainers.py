"""The explainers (token-attribution methods): one record each, the only place a method is declared.

Everything that treats methods differently reads these records: the computation (analysis.explanations
`explain_example` calls each record's `compute`), the validation of `--methods` (flows/settings.py: an unknown name
is refused when the command line is parsed, with the names that exist), the results' description of each method
(tasks/explain.py, storage_schemas/explanation_results.py), the claims and the ranking (analysis.explanation_claims:
which methods read attention, which are efficient and what their raw twin is), the Kendall τ references, and the
report's line styles and list of what each method is (analysis.explanation_figures). The options of one explanation
run (`ExplanationSettings`, which names the methods) are declared here too, with their defaults.

Two sorts of records:
- the fixed ones, in REGISTRY below (the model baselines, random) and any added with `register_explainer`;
- the attention-based ones, derived for raw attention and every registered efficient-attention variant
  (analysis.variants) in each aggregation: `SOURCE:AGGREGATION` (the pooled row of A or E) and
  `SOURCE-norm:AGGREGATION` (norm-based, Kobayashi et al. 2020). A variant registered at run time gets its twins.

Adding an explainer: one `Explainer` record in REGISTRY below, plus its tests (or `register_explainer(Explainer(...))`
at run time, e.g. in a notebook; in this process only, as for variants: Dask workers must register it too).
This module imports neither torch nor the computations (flows/settings.py reads it before torch is imported): the
built-in compute functions import analysis.explanations when they are first called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from analysis.aggregations import AGGREGATIONS
from analysis.variants import VARIANTS, variant_record

if TYPE_CHECKING:  # numpy arrays and the model only in the annotations
    import numpy as np

    from analysis.explanations import GradientAttributions
    from analysis.models import LoadedModel

PERCENTS: tuple[int, ...] = (1, 5, 10, 20, 50)  # ERASER's bins
ATTENTION_SOURCE = "attention"
NORM_SUFFIX = "-norm"  # `attention-norm:rollout`: norm-based attention (Kobayashi et al. 2020) of a source
# kind: what a method reads. 'matrices' and 'norms' read the stored attention of `source` (raw attention or an
# efficient variant; 'norms' also the values and output projections), 'model' runs forward / backward passes,
# 'random' reads nothing.
KINDS = ("matrices", "norms", "model", "random")
ATTENTION_COLOUR = "#d62728"
MODEL_COLOUR = "#000000"
RANDOM_COLOUR = "#7f7f7f"
AGGREGATION_LINES = {"last-layer": "-", "all-layers": "--", "rollout": ":"}


@dataclass
class ExampleInputs:
    """One example as every explainer sees it (built by analysis.explanations.explain_example).

    tokens: [L] the real ids; pooled: where the prediction is read; target: the predicted class (or token);
    removable: [L] bool; matrices: {source: [layer, head, L, L]} raw attention ('attention') and the efficient
    variants on the real block; value: [layer, kv_head, L, d] and w_out: [layer, head, d, D] (None when no method
    needs them); score: keep masks [n, L] bool -> [n] target probabilities; full_probability: p(x)."""

    loaded: LoadedModel
    tokens: np.ndarray
    pooled: int
    target: int
    removable: np.ndarray
    replacement_id: int
    matrices: Mapping[str, np.ndarray]
    value: np.ndarray | None
    w_out: np.ndarray | None
    settings: ExplanationSettings
    example_index: int
    score: Callable[[np.ndarray], np.ndarray]
    full_probability: float
    _gradients: GradientAttributions | None = field(default=None, repr=False)

    def gradients(self) -> GradientAttributions:
        """Input × gradient and integrated gradients, computed once for every method that reads them."""
        if self._gradients is None:
            from analysis.explanations import gradient_attributions

            self._gradients = gradient_attributions(
                self.loaded,
                self.tokens,
                self.removable,
                self.pooled,
                self.target,
                self.replacement_id,
                self.settings.integrated_gradients_steps,
            )
        return self._gradients

    @property
    def integrated_gradients_delta(self) -> float:
        """Captum's convergence delta; NaN when no method computed the gradients."""
        return float("nan") if self._gradients is None else self._gradients.delta


# compute(example, record) -> [L] float64, one score per token (NaN where not measured); `record` is the explainer's
# own record (a derived one reads its source and aggregation).
ComputeFunction = Callable[[ExampleInputs, "Explainer"], "np.ndarray"]


@dataclass(frozen=True)
class Explainer:
    """One token-attribution method.

    name: its name on the command line and in the results (`explainer` coordinate).
    kind: one of KINDS (what it reads; the results' `explainer_kind`).
    description: one line, stored with the results and shown in the report.
    compute: see ComputeFunction.
    style: its line in the report's figures (matplotlib keywords: color, linestyle, linewidth, marker, alpha).
    source, aggregation: for 'matrices' and 'norms': whose stored attention it reads (ATTENTION_SOURCE or an
        efficient variant) and how it aggregates the pooled row (AGGREGATIONS).
    reference: its column among the rank-agreement references (Kendall τ of every method against it, 0 first);
        None: not a reference.
    """

    name: str
    kind: str
    description: str
    compute: ComputeFunction
    style: Mapping[str, Any]
    source: str = ""
    aggregation: str = ""
    reference: int | None = None

    def __post_init__(self) -> None:
        if not self.name or any(character in self.name for character in ", \t\n"):
            raise ValueError(
                f"explainer name {self.name!r} must be non-empty without ',' or spaces (it names a "
                "coordinate value and command-line lists)"
            )
        if self.kind not in KINDS:
            raise ValueError(f"explainer {self.name!r}: kind {self.kind!r} must be one of {KINDS}")
        if self.reads_matrices and (not self.source or self.aggregation not in AGGREGATIONS):
            raise ValueError(
                f"explainer {self.name!r} reads stored attention: give its source ({ATTENTION_SOURCE} "
                f"or a variant) and an aggregation of {list(AGGREGATIONS)}"
            )
        if not callable(self.compute):
            raise ValueError(f"explainer {self.name!r}: compute must be a function (example, record) -> [L] scores")

    @property
    def reads_matrices(self) -> bool:
        """True for methods computed from the stored attention (or efficient attention) matrices."""
        return self.kind in ("matrices", "norms")

    @property
    def is_efficient(self) -> bool:
        """True for methods that read an efficient variant (whose twin on raw attention is `raw_twin`)."""
        return self.reads_matrices and self.source != ATTENTION_SOURCE

    @property
    def raw_twin(self) -> str:
        """The same method on raw attention: `attention:AGG` or `attention-norm:AGG`."""
        return f"{ATTENTION_SOURCE}{NORM_SUFFIX if self.kind == 'norms' else ''}:{self.aggregation}"

    def stored(self) -> dict[str, str]:
        """What the results record of it: their `explainer`, `explainer_kind`, `explainer_source` and
        `explainer_aggregation` (storage_schemas.explanation_results.create_explanation_results's `methods`)."""
        return {"name": self.name, "kind": self.kind, "source": self.source, "aggregation": self.aggregation}


# ------------------------------------------------------------------------------------------------ compute functions


def _matrix_scores(example: ExampleInputs, record: Explainer) -> np.ndarray:
    from analysis.aggregations import matrix_attributions

    return matrix_attributions(example.matrices[record.source], example.pooled, record.aggregation)


def _norm_scores(example: ExampleInputs, record: Explainer) -> np.ndarray:
    from analysis.explanations import norm_attributions

    if example.value is None or example.w_out is None:
        raise ValueError(f"method {record.name} needs the stored values and output projections")
    return norm_attributions(
        example.matrices[record.source], example.value, example.w_out, example.pooled, record.aggregation
    )


def _input_x_gradient(example: ExampleInputs, record: Explainer) -> np.ndarray:
    return example.gradients().input_x_gradient


def _integrated_gradients(example: ExampleInputs, record: Explainer) -> np.ndarray:
    return example.gradients().integrated_gradients


def _leave_one_out(example: ExampleInputs, record: Explainer) -> np.ndarray:
    from analysis.explanations import leave_one_out

    return leave_one_out(
        example.score, example.full_probability, example.removable, example.settings.leave_one_out_max_tokens
    )


def _conservative_lrp(example: ExampleInputs, record: Explainer) -> np.ndarray:
    from analysis.explanations import conservative_attributions

    return conservative_attributions(example.loaded, example.tokens, example.pooled, example.target)


def _random(example: ExampleInputs, record: Explainer) -> np.ndarray:
    from analysis.explanations import random_attributions

    return random_attributions(len(example.tokens), example.settings.seed, example.example_index)


def attention_explainer(source: str, aggregation: str, norms: bool = False) -> Explainer:
    """The record of `SOURCE:AGGREGATION` (norms: `SOURCE-norm:AGGREGATION`), source ATTENTION_SOURCE or an
    efficient variant: its colour is the variant's (red for raw attention), its line style the aggregation's; the
    norm-based twin is drawn thin with square markers."""
    what = "raw attention A" if source == ATTENTION_SOURCE else f"efficient attention ({source})"
    if norms:
        what = f"norm-based {what}, ||sum_h weight_ij t_j^h|| (Kobayashi et al. 2020)"
    colour = ATTENTION_COLOUR if source == ATTENTION_SOURCE else variant_record(source).colour
    style = {"color": colour, "linestyle": AGGREGATION_LINES[aggregation]}
    return Explainer(
        name=f"{source}{NORM_SUFFIX if norms else ''}:{aggregation}",
        kind="norms" if norms else "matrices",
        description=f"{what}: {AGGREGATIONS[aggregation]}",
        compute=_norm_scores if norms else _matrix_scores,
        style={**style, "linewidth": 0.8, "marker": "s"} if norms else style,
        source=source,
        aggregation=aggregation,
    )


# ------------------------------------------------------------------------------------------------ the registry


def _attention_record(name: str) -> Explainer | None:
    """The derived record called `name` (`SOURCE:AGG`, `SOURCE-norm:AGG` of raw attention or a registered variant),
    else None."""
    source, _, aggregation = name.partition(":")
    norms = source.endswith(NORM_SUFFIX)
    if norms:
        source = source[: -len(NORM_SUFFIX)]
    if aggregation not in AGGREGATIONS or (source != ATTENTION_SOURCE and source not in VARIANTS):
        return None
    return attention_explainer(source, aggregation, norms)


class ExplainerRegistry:
    """The fixed explainers, in registration order (the order of default runs after the attention-based ones)."""

    def __init__(self, explainers: tuple[Explainer, ...] = ()) -> None:
        self._records: dict[str, Explainer] = {}
        for record in explainers:
            self.register(record)

    def records(self) -> tuple[Explainer, ...]:
        return tuple(self._records.values())

    def get(self, name: str) -> Explainer | None:
        return self._records.get(name)

    def register(self, record: Explainer) -> Explainer:
        if record.name in self._records or _attention_record(record.name) is not None:
            raise ValueError(f"an explainer named {record.name!r} exists already: choose another name")
        if record.reference is not None and record.reference in {other.reference for other in self.records()}:
            raise ValueError(f"explainer {record.name!r}: reference column {record.reference} is taken")
        self._records[record.name] = record
        return record

    def unregister(self, name: str) -> Explainer:
        return self._records.pop(name)


REGISTRY = ExplainerRegistry(
    (
        Explainer(
            name="input-x-gradient",
            kind="model",
            description="input embeddings x gradient of the target probability, summed over the hidden dim",
            compute=_input_x_gradient,
            style={"color": MODEL_COLOUR, "linestyle": "-."},
        ),
        Explainer(
            name="integrated-gradients",
            kind="model",
            description="Captum integrated gradients of the target probability from the removal-token baseline",
            compute=_integrated_gradients,
            style={"color": MODEL_COLOUR, "linestyle": "-"},
            reference=1,
        ),
        Explainer(
            name="leave-one-out",
            kind="model",
            description="p(x) - p(x without the token), one forward per removable token",
            compute=_leave_one_out,
            style={"color": MODEL_COLOUR, "linestyle": "--"},
            reference=0,
        ),
        Explainer(
            name="conservative-lrp",
            kind="model",
            description="conservative propagation (LRP class): gradient x input of the target logit with attention, "
            "normalisation scales and activation gates held constant (Ali et al. 2022, AttnLRP's rules)",
            compute=_conservative_lrp,
            style={"color": MODEL_COLOUR, "linestyle": ":"},
        ),
        Explainer(
            name="random",
            kind="random",
            description="a seeded random ranking (the floor)",
            compute=_random,
            style={"color": RANDOM_COLOUR, "linestyle": "-", "linewidth": 2.5, "alpha": 0.6},
        ),
    )
)


def attention_method_names(sources: Sequence[str]) -> list[str]:
    """`SOURCE:AGG` of every source in every aggregation, then the norm-based twins in the same order."""
    return [f"{source}:{aggregation}" for source in sources for aggregation in AGGREGATIONS] + [
        f"{source}{NORM_SUFFIX}:{aggregation}" for source in sources for aggregation in AGGREGATIONS
    ]


def default_methods(variants: Sequence[str]) -> list[str]:
    """Raw attention and every given variant in every aggregation, their norm-based twins, then the fixed explainers
    (the model baselines, random, then any registered)."""
    return attention_method_names([ATTENTION_SOURCE, *variants]) + [record.name for record in REGISTRY.records()]


def known_explainers() -> list[str]:
    """Every name an explainer has now: the attention-based ones of raw attention and every registered variant, and
    the fixed ones."""
    return default_methods(list(VARIANTS))


def explainer_record(name: str) -> Explainer:
    """The record of the explainer called `name` (a ValueError names the ones that exist)."""
    record = REGISTRY.get(name) or _attention_record(name)
    if record is None:
        raise ValueError(
            f"unknown explanation method {name!r}: use SOURCE:AGGREGATION or SOURCE-norm:AGGREGATION (SOURCE "
            f"{ATTENTION_SOURCE} or an efficient variant of {list(VARIANTS)}, AGGREGATION one of {list(AGGREGATIONS)}),"
            f" or one of {[record.name for record in REGISTRY.records()]}; or register it with "
            "analysis.explainers.register_explainer(Explainer(...))"
        )
    return record


def require_known_explainers(names: Sequence[str]) -> None:
    """Refuse (ValueError) a list of methods with an unknown name, a repeated name, or none."""
    for name in names:
        explainer_record(name)
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated or not names:
        raise ValueError(f"explanation methods must be given once each and at least one; got {list(names)}")


def references() -> tuple[str, ...]:
    """The methods every attribution's rank agreement (Kendall τ) is measured against, in column order."""
    chosen = [record for record in REGISTRY.records() if record.reference is not None]
    return tuple(record.name for record in sorted(chosen, key=lambda record: record.reference))


def register_explainer(record: Explainer) -> Explainer:
    """Add an explainer: from now on this process computes, stores, claims and draws it (see the module doc)."""
    return REGISTRY.register(record)


def unregister_explainer(name: str) -> Explainer:
    return REGISTRY.unregister(name)


@contextlib.contextmanager
def registered_explainer(record: Explainer) -> Iterator[Explainer]:
    """`record` registered for the duration of a `with` block (tests, experiments)."""
    register_explainer(record)
    try:
        yield record
    finally:
        unregister_explainer(record.name)


# ------------------------------------------------------------------------------------------------ a run's options


@dataclass(frozen=True)
class ExplanationSettings:
    """Everything that shapes the numbers of an explanation run (stored as the results' `settings`; a rerun with
    other settings is refused). The one declaration of these options and their defaults: `effattn explain`
    (flows.settings.ExplainSettings) reads its defaults from here and builds this object with
    `ExplainSettings.explanation_settings`."""

    methods: tuple[str, ...]
    examples: tuple[int, ...]  # indices into the attention store
    percents: tuple[int, ...] = PERCENTS
    integrated_gradients_steps: int = 32
    leave_one_out_max_tokens: int = 128  # longer examples get no leave-one-out (NaN): its cost is one forward a token
    minimality_rows: int = 8  # sampled simplex rows per example and layer (0: no minimality test)
    minimality_tolerance: float = 1e-8
    seed: int = 0
    shard_size: int = 8

    def __post_init__(self) -> None:
        require_known_explainers(self.methods)  # an unknown name is refused here, with the names that exist
        if not self.percents or any(not 0 < k <= 100 for k in self.percents):
            raise ValueError(f"percents must be in (0, 100], got {list(self.percents)}")
        for name in ("integrated_gradients_steps", "leave_one_out_max_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.minimality_rows < 0:
            raise ValueError(f"minimality_rows must be 0 (no test) or more, got {self.minimality_rows}")

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of the option `name` (flows/settings.py reads the command line's defaults here)."""
        return cls.__dataclass_fields__[name].default

    def record(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
