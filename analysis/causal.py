"""Causal tests: forward passes with injected attention, the places they are injected, and what is measured.

A *target* is the set of (layer, head) pairs an intervention replaces at once: one head (scope "head"), every
head of one layer ("layer") or every head of every layer ("all"). Many targets run in one batched forward pass:
the batch is repeated once per target (copy-major) and each copy replaces only its own target's heads
(analysis.attention_backend.LayerInjection), so there is no Python loop per head in the forward pass.

Metrics compare the intervened model's predictions with the original model's (`original_logits`):
classification predicts one class per example; next-token predicts the next token at every real position.

What a run measures is a `CausalPlan` (interventions as objects, scopes, targets, seed; stored as the results'
`settings` attribute). One shard's work is cut into pieces tested on their own: a `CausalBatch` (what is read
for a batch), `BatchMetrics` (the metrics for the store's task) and `forward_groups` (the targets x examples of
each forward pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analysis.attention_backend import AttentionInjection, LayerInjection, inject_attention
from analysis.example_identities import keyed_share, share_for_count
from analysis.extraction import real_token_mask
from analysis.interventions import Intervention, parse_interventions
from analysis.models import LoadedModel

SCOPES: tuple[str, ...] = ("all", "layer", "head")
SCOPE_DRAW = "scope"  # the purpose of the keyed draw of a growing store's layer- and head-scope examples

# name -> description; every metric is per (intervention, target, example).
METRICS: dict[str, str] = {
    "agreement": "share of predictions equal to the original model's (classification: 0 or 1; next-token: share "
    "of real positions whose top-1 token is kept)",
    "flipped": "1 when at least one prediction differs from the original model's, else 0",
    "max_abs_logit_change": "largest |intervened logit - original logit| (next-token: over real positions and "
    "the whole vocabulary)",
    "kl_divergence": "KL(original || intervened) of the predicted distributions, in nats (next-token: mean over "
    "real positions)",
    "correct": "share of correct predictions against the labels (next-token: the actual next token); NaN when "
    "the example has no label",
    "stored_logit_difference": "largest |intervened logit - stored logit| over the logits kept in the store (the "
    "replay check)",
}


def _indices(chosen: int | Sequence[int]) -> list[int]:
    """Model indices of the stored layers (or heads): a count means all of them, 0..count-1."""
    return list(range(chosen)) if isinstance(chosen, (int, np.integer)) else [int(index) for index in chosen]


@dataclass(frozen=True)
class Target:
    """Where an intervention is injected: scope 'all' (layer = head = -1), 'layer' (head = -1) or 'head'.
    `layer` and `head` are model indices (in a store of selected layers and heads, the model's numbers)."""

    scope: str
    layer: int = -1
    head: int = -1

    @property
    def name(self) -> str:
        if self.scope == "all":
            return "all"
        if self.scope == "layer":
            return f"layer {self.layer}"
        return f"layer {self.layer} head {self.head}"

    def mask(self, layers: int | Sequence[int], heads: int | Sequence[int]) -> np.ndarray:
        """[stored layer, stored head] bool: the heads replaced. layers, heads: the model indices of the stored
        layers and heads (a store's selection), or counts when every one is stored."""
        layers, heads = _indices(layers), _indices(heads)
        chosen = np.zeros((len(layers), len(heads)), dtype=bool)
        if self.scope == "all":
            chosen[:] = True
        elif self.scope == "layer":
            chosen[layers.index(self.layer)] = True
        else:
            chosen[layers.index(self.layer), heads.index(self.head)] = True
        return chosen


def target_attribute(target: Target) -> dict[str, Any]:
    """A target as the results' `settings` attribute records it."""
    return {"name": target.name, "scope": target.scope, "layer": target.layer, "head": target.head}


def targets_for(scopes: Sequence[str], layers: int | Sequence[int], heads: int | Sequence[int]) -> list[Target]:
    """Every target of the given scopes, in the order all, layer 0.., layer 0 head 0..; layers, heads: the model
    indices of the stored layers and heads (a store's selection), or counts when every one is stored."""
    layers, heads = _indices(layers), _indices(heads)
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"unknown scopes {unknown or list(scopes)}: choose from {list(SCOPES)}")
    targets = []
    if "all" in scopes:
        targets.append(Target("all"))
    if "layer" in scopes:
        targets += [Target("layer", layer) for layer in layers]
    if "head" in scopes:
        targets += [Target("head", layer, head) for layer in layers for head in heads]
    return targets


@torch.inference_mode()
def plain_logits(loaded: LoadedModel, tokens: np.ndarray, length: np.ndarray) -> torch.Tensor:
    """The unmodified model's logits for a batch trimmed to Lb = max(length): [batch, class] or
    [batch, Lb, vocab] (next-token), float32 on the CPU."""
    batch_length = int(np.max(length))
    input_ids = torch.as_tensor(tokens[:, :batch_length], dtype=torch.long, device=loaded.device)
    mask = torch.as_tensor(real_token_mask(length, batch_length), device=loaded.device).long()
    return loaded.model(input_ids=input_ids, attention_mask=mask).logits.float().cpu()


@torch.inference_mode()
def intervened_logits(
    loaded: LoadedModel,
    tokens: np.ndarray,
    length: np.ndarray,
    replacement: np.ndarray,
    target_masks: np.ndarray,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Logits with `replacement` injected at each target, all targets in one forward pass.

    tokens: [batch, >= Lb] right-padded ids; length: [batch]; replacement: [batch, layer, head, >= Lb, >= Lb]
    matrices (zero outside the real block); target_masks: [target, layer, head] bool; layer and head count the
    stored ones, whose model indices are `layers` and `heads` (a store's selection; None: every one of the model).
    The model's other layers and heads run unchanged.
    Returns [target, batch, class] or [target, batch, Lb, vocab] (next-token), float32 on the CPU.
    """
    batch_length = int(np.max(length))
    copies, stored_layers, stored_heads = target_masks.shape
    layers = list(range(stored_layers)) if layers is None else [int(layer) for layer in layers]
    heads = list(range(stored_heads)) if heads is None else [int(head) for head in heads]
    if (len(layers), len(heads)) != (stored_layers, stored_heads):
        raise ValueError(
            f"target masks for {stored_layers} layers x {stored_heads} heads, but the selection names "
            f"{len(layers)} layers and {len(heads)} heads"
        )
    model_heads = loaded.shape.heads
    batch = len(length)
    device = loaded.device
    input_ids = torch.as_tensor(tokens[:, :batch_length], dtype=torch.long, device=device).repeat(copies, 1)
    real_tokens = torch.as_tensor(real_token_mask(length, batch_length), device=device)
    attention_mask = real_tokens.long().repeat(copies, 1)
    real_block = (real_tokens[:, :, None] & real_tokens[:, None, :])[:, None]  # [batch, 1, Lb, Lb]
    everything = heads == list(range(model_heads))
    injection = AttentionInjection()
    for stored, layer in enumerate(layers):
        if not target_masks[:, stored].any():
            continue
        matrices = replacement[:, stored, :, :batch_length, :batch_length]
        replace = target_masks[:, stored, :]
        if not everything:  # the model's unstored heads keep their own attention
            full = np.zeros((batch, model_heads, *matrices.shape[2:]), dtype=matrices.dtype)
            full[:, heads] = matrices
            full_replace = np.zeros((copies, model_heads), dtype=bool)
            full_replace[:, heads] = replace
            matrices, replace = full, full_replace
        injection.layers[layer] = LayerInjection(
            replacement=torch.as_tensor(matrices, device=device),
            replace=torch.as_tensor(replace, device=device)[:, None, :].expand(copies, batch, model_heads),
            real=real_block,
        )
    with inject_attention(injection):
        logits = loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.float().cpu().view(copies, batch, *logits.shape[1:])


def _kl_divergence(original: torch.Tensor, intervened: torch.Tensor) -> torch.Tensor:
    """KL(softmax(original) || softmax(intervened)) over the last dim, in nats (float32: next-token logits span the
    vocabulary at every position, so no float64 copies of them are made)."""
    log_original = torch.log_softmax(original.float(), dim=-1)
    log_intervened = torch.log_softmax(intervened.float(), dim=-1)
    return (log_original.exp() * (log_original - log_intervened)).sum(-1).clamp(min=0)


def classification_metrics(
    original_logits: np.ndarray, stored_logits: np.ndarray, intervened: torch.Tensor, label: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics of every target and example.

    original_logits, stored_logits: [batch, class] (the original model's, and the stored ones: the same for a
    classification store); intervened: [target, batch, class]; label: [batch] class ids, -1 when unknown.
    Returns {metric: [target, batch] float32}.
    """
    original = torch.as_tensor(original_logits, dtype=torch.float32)
    agreement = (intervened.argmax(-1) == original.argmax(-1)[None]).double()
    correct = (intervened.argmax(-1) == torch.as_tensor(label)[None]).double()
    correct = torch.where(torch.as_tensor(label)[None] >= 0, correct, torch.nan)
    metrics = {
        "agreement": agreement,
        "flipped": 1.0 - agreement,
        "max_abs_logit_change": (intervened - original[None]).abs().amax(-1),
        "kl_divergence": _kl_divergence(original[None], intervened),
        "correct": correct,
        "stored_logit_difference": (intervened - torch.as_tensor(stored_logits)[None]).abs().amax(-1),
    }
    return {name: values.numpy().astype(np.float32) for name, values in metrics.items()}


def next_token_metrics(
    original_logits: torch.Tensor,
    stored_logits: np.ndarray,
    stored_logit_ids: np.ndarray,
    intervened: torch.Tensor,
    tokens: np.ndarray,
    length: np.ndarray,
) -> dict[str, np.ndarray]:
    """Metrics of every target and example for next-token prediction, over the real positions.

    original_logits: [batch, Lb, vocab] the unmodified model's; stored_logits, stored_logit_ids: [batch, >= Lb,
    top_k] what the store kept; intervened: [target, batch, Lb, vocab]; tokens: [batch, >= Lb] (the next token of
    position p is tokens[p + 1]); length: [batch]. Returns {metric: [target, batch] float32}.
    """
    batch_length = intervened.shape[2]  # the longest example of these rows (<= the original's length)
    original_logits = original_logits[:, :batch_length]
    real = torch.as_tensor(real_token_mask(length, batch_length))  # [batch, Lb]
    count = real.sum(-1).clamp(min=1).double()
    original_top = original_logits.argmax(-1)  # [batch, Lb]
    intervened_top = intervened.argmax(-1)  # [target, batch, Lb]
    kept = (intervened_top == original_top[None]) & real[None]
    next_token = torch.as_tensor(tokens[:, 1 : batch_length + 1], dtype=torch.long)
    has_next = torch.as_tensor(real_token_mask(np.asarray(length) - 1, batch_length))[:, : next_token.shape[1]]
    correct = ((intervened_top[..., : next_token.shape[1]] == next_token[None]) & has_next[None]).sum(-1)
    next_count = has_next.sum(-1).double()
    change = ((intervened - original_logits[None]).abs().amax(-1) * real[None]).amax(-1)
    divergence = (_kl_divergence(original_logits[None], intervened) * real[None]).sum(-1) / count
    ids = torch.as_tensor(stored_logit_ids[:, :batch_length], dtype=torch.long)
    kept_logits = torch.gather(intervened, -1, ids[None].expand(intervened.shape[0], *ids.shape))
    stored = torch.as_tensor(stored_logits[:, :batch_length])[None]
    stored_difference = ((kept_logits - stored).abs().amax(-1) * real[None]).amax(-1)
    metrics = {
        "agreement": kept.sum(-1).double() / count,
        "flipped": ((~kept & real[None]).any(-1)).double(),
        "max_abs_logit_change": change,
        "kl_divergence": divergence,
        "correct": torch.where(next_count > 0, correct.double() / next_count.clamp(min=1), torch.nan),
        "stored_logit_difference": stored_difference,
    }
    return {name: values.numpy().astype(np.float32) for name, values in metrics.items()}


def injected_change_ratio(injected: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """||injected - A||_F / ||A||_F over every layer and head of each example: how far the injected matrices are
    from the real ones. injected, attention: [example, layer, head, L, L]. Returns [example] float32.
    Summed in float64 one layer of one example at a time: temporaries of the whole batch in float64 are GBs at
    512 tokens, freshly mapped for every intervention. einsum, not BLAS: BLAS threads left spinning after a dot
    product slow the model's own threads down."""
    squared_change, squared_norm = np.zeros(len(injected)), np.zeros(len(injected))
    for example in range(injected.shape[0]):
        for layer in range(injected.shape[1]):
            real = attention[example, layer].astype(np.float64)
            change = np.subtract(injected[example, layer], real, dtype=np.float64)
            squared_change[example] += np.einsum("hqk,hqk->", change, change)
            squared_norm[example] += np.einsum("hqk,hqk->", real, real)
    norm = np.sqrt(squared_norm)
    return (np.sqrt(squared_change) / np.where(norm > 0, norm, 1.0)).astype(np.float32)


# The aggregates of the per-example metrics: a mean over the examples measured, or the largest value.
MEAN_AGGREGATES = {
    "agreement_rate": "agreement",
    "flip_rate": "flipped",
    "mean_kl_divergence": "kl_divergence",
    "accuracy": "correct",
}
LARGEST_AGGREGATES = {
    "largest_logit_change": "max_abs_logit_change",
    "largest_stored_logit_difference": "stored_logit_difference",
}


def aggregate_metrics(metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-(intervention, target) aggregates of per-example metrics {name: [intervention, target, example]}
    (NaN: not measured). Returns the arrays of storage_schemas.causal_results.AGGREGATES, [intervention, target]."""
    return aggregate_metric_parts([metrics])


def aggregate_metric_parts(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`aggregate_metrics` of metrics given in parts along the example axis (each {name: [intervention, target,
    examples of the part]}, e.g. one results shard at a time), so that memory does not grow with the corpus."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    largest: dict[str, np.ndarray] = {}
    examples_measured = None
    for metrics in parts:
        for name, metric in MEAN_AGGREGATES.items():
            values = metrics[metric].astype(np.float64)
            has = ~np.isnan(values)
            sums[name] = sums.get(name, 0.0) + np.where(has, values, 0.0).sum(-1)
            counts[name] = counts.get(name, 0) + has.sum(-1)
        for name, metric in LARGEST_AGGREGATES.items():
            part = np.fmax.reduce(metrics[metric].astype(np.float64), axis=-1, initial=-np.inf)  # NaN skipped
            largest[name] = np.maximum(largest[name], part) if name in largest else part
        measured = (~np.isnan(metrics["agreement"])).sum(-1)
        examples_measured = measured if examples_measured is None else examples_measured + measured
    if examples_measured is None:
        raise ValueError("no metrics to aggregate: give at least one part")
    aggregates = {
        name: np.where(counts[name] > 0, sums[name] / np.maximum(counts[name], 1), np.nan) for name in MEAN_AGGREGATES
    }
    aggregates.update(
        {name: np.where(np.isneginf(largest[name]), np.nan, largest[name]) for name in LARGEST_AGGREGATES}
    )
    aggregates["examples_measured"] = examples_measured.astype(np.float64)
    return aggregates


def measured_examples(n_examples: int, count: int | None) -> np.ndarray:
    """`count` example indices spread evenly over 0..n_examples-1 (all when count is None or >= n_examples).
    The store keeps examples sorted by length, so an even spread covers short and long ones."""
    if count is None or count >= n_examples:
        return np.arange(n_examples)
    return np.unique(np.linspace(0, n_examples - 1, count).round().astype(np.int64))


def scope_share(identities: np.ndarray, seed: int, count: int | None) -> float:
    """The share of a growing store's examples (identities: uint8 [n, IDENTITY_BYTES]) the layer and head scopes
    measure: 1.0 for all (count None), else the share below which exactly `count` keyed draws fall
    (analysis.example_identities.share_for_count), fixed when the results are created (a grown store keeps it)."""
    return share_for_count(keyed_share(identities, seed, SCOPE_DRAW), count)


def keyed_scope_examples(identities: np.ndarray, seed: int, share: float) -> np.ndarray:
    """int64 [k]: the rows of `identities` (uint8 [n, IDENTITY_BYTES]) measured at the layer and head scopes of a
    store that grows: those whose keyed draw (`keyed_share(..., seed, "scope")`) is below `share` (`scope_share`).
    An example's choice depends only on its identity: growth never changes which earlier examples are measured."""
    return np.flatnonzero(keyed_share(identities, seed, SCOPE_DRAW) < share).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# the plan of a run, and the pieces of one shard's work


@dataclass(frozen=True)
class CausalPlan:
    """Everything that shapes the numbers of a causal run, resolved (tasks.causal.causal_plan builds it): the
    interventions, which of them are also measured one layer / one head at a time, the targets of the scopes, how
    many examples the layer and head scopes measure (None: all), the noise seed and the identity of the store.

    Stored as the results' `settings` attribute (`as_attribute`, read back with `from_attribute`); a rerun with
    another plan is refused (storage_schemas.causal_results.check_same_settings)."""

    interventions: tuple[Intervention, ...]
    scopes: tuple[str, ...]
    layer_interventions: tuple[Intervention, ...]
    head_interventions: tuple[Intervention, ...]
    scope_examples: int | None
    targets: tuple[Target, ...]
    seed: int
    # the store's model, corpus, size, dtype and efficient settings: compared with a rerun's, never interpreted
    store_identity: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for scope, listed in (("layer", self.layer_interventions), ("head", self.head_interventions)):
            unknown = [item.name for item in listed if item not in self.interventions]
            if unknown:
                raise ValueError(
                    f"--{scope}-interventions {unknown} are not among the interventions run: "
                    f"{[item.name for item in self.interventions]}"
                )

    @property
    def scope_interventions(self) -> dict[str, tuple[Intervention, ...]]:
        """scope -> the interventions measured at its targets (scope "all": every intervention)."""
        return {"all": self.interventions, "layer": self.layer_interventions, "head": self.head_interventions}

    def scope_plan(self) -> list[tuple[Intervention, list[tuple[str, list[int]]]]]:
        """For every intervention measured somewhere, the scopes it is measured at with the indices of their
        targets (in `targets`)."""
        plan = []
        for intervention in self.interventions:
            scopes = [
                (scope, [index for index, target in enumerate(self.targets) if target.scope == scope])
                for scope in self.scopes
                if intervention in self.scope_interventions[scope]
            ]
            if scopes:
                plan.append((intervention, scopes))
        return plan

    def efficient_variants(self) -> list[str]:
        """The variants whose stored efficient attention the interventions read, sorted."""
        return sorted({item.variant_name for item in self.interventions if item.needs_efficient})

    def target_masks(self, layers: int | Sequence[int], heads: int | Sequence[int]) -> np.ndarray:
        """[target, stored layer, stored head] bool: the heads each target replaces (layers, heads: as in
        Target.mask)."""
        return np.stack([target.mask(layers, heads) for target in self.targets])

    def as_attribute(self) -> dict[str, Any]:
        """The plan as the results' `settings` attribute (plain JSON; the layout results have always had)."""
        names = [item.name for item in self.interventions]
        return {
            "interventions": names,
            "scopes": list(self.scopes),
            "scope_interventions": {
                scope: [item.name for item in listed] for scope, listed in self.scope_interventions.items()
            },
            "scope_examples": None if self.scope_examples is None else int(self.scope_examples),
            "targets": [target_attribute(target) for target in self.targets],
            "seed": int(self.seed),
            "store_identity": dict(self.store_identity),
        }

    @classmethod
    def from_attribute(cls, settings: Mapping[str, Any]) -> CausalPlan:
        """The plan a results' `settings` attribute records (the names are parsed once, here)."""
        return cls(
            interventions=tuple(parse_interventions(settings["interventions"])),
            scopes=tuple(settings["scopes"]),
            layer_interventions=tuple(map(Intervention.parse, settings["scope_interventions"]["layer"])),
            head_interventions=tuple(map(Intervention.parse, settings["scope_interventions"]["head"])),
            scope_examples=settings["scope_examples"],
            targets=tuple(Target(item["scope"], item["layer"], item["head"]) for item in settings["targets"]),
            seed=int(settings["seed"]),
            store_identity=settings["store_identity"],
        )


@dataclass
class CausalBatch:
    """Examples start .. start + batch - 1 of an attention store, as the causal stage reads them (trimmed to
    Lb = max(length) where the arrays have an L×L block).

    tokens: [batch, position]; length: [batch]; attention: [batch, layer, head, Lb, Lb]; value: [batch, layer,
    kv_head, Lb, head_dim]; stored_logits: [batch, class] (classification) or [batch, position, top_k]
    (next-token); label: [batch] (classification, -1 when unknown); stored_logit_ids: [batch, position, top_k]
    (next-token); efficient: variant -> [batch, layer, head, Lb, Lb] its stored efficient attention; noise_keys:
    [batch] what seeds the noise (a store that grows), None: the store indices."""

    start: int
    tokens: np.ndarray
    length: np.ndarray
    attention: np.ndarray
    value: np.ndarray
    stored_logits: np.ndarray
    label: np.ndarray | None = None
    stored_logit_ids: np.ndarray | None = None
    efficient: dict[str, np.ndarray] = field(default_factory=dict)
    noise_keys: np.ndarray | None = None  # [batch] int64 what seeds each example's noise (None: its store index)

    @property
    def example_indices(self) -> np.ndarray:
        """[batch] the examples' indices in the store."""
        return np.arange(self.start, self.start + len(self.length))

    @property
    def seed_keys(self) -> np.ndarray:
        """[batch] what seeds each example's noise: `noise_keys` (a store that grows: from the examples' identities,
        analysis.example_identities.seed_keys) or the store indices."""
        return self.example_indices if self.noise_keys is None else self.noise_keys

    def examples_at(self, scope: str, scoped: set[int]) -> np.ndarray:
        """Positions in the batch of the examples measured at `scope`: every one at scope "all", those among
        `scoped` (store indices: measured_examples) at the layer and head scopes."""
        if scope == "all":
            return np.arange(len(self.length))
        return np.array(
            [offset for offset, index in enumerate(self.example_indices) if int(index) in scoped], dtype=np.int64
        )


@dataclass
class BatchMetrics:
    """The metrics of one batch for the store's task: classification compares with the stored logits (those of
    the original model), next-token with `original`, the unmodified model's logits [batch, Lb, vocab]."""

    batch: CausalBatch
    task: str
    original: torch.Tensor | None = None

    @classmethod
    def for_batch(cls, loaded: LoadedModel, batch: CausalBatch, task: str) -> BatchMetrics:
        """Next-token stores keep only the top-k logits: the original model's are computed here."""
        original = plain_logits(loaded, batch.tokens, batch.length) if task == "next-token" else None
        return cls(batch, task, original)

    def measure(self, intervened: torch.Tensor, chosen: np.ndarray) -> dict[str, np.ndarray]:
        """{metric: [target, chosen]} of intervened logits [target, chosen, class] (next-token: [target, chosen,
        Lb', vocab]) of the batch's examples at positions `chosen`."""
        batch = self.batch
        if self.task == "next-token":
            return next_token_metrics(
                self.original[chosen],
                batch.stored_logits[chosen],
                batch.stored_logit_ids[chosen],
                intervened,
                batch.tokens[chosen],
                batch.length[chosen],
            )
        return classification_metrics(
            batch.stored_logits[chosen], batch.stored_logits[chosen], intervened, batch.label[chosen]
        )

    def original_correct(self) -> np.ndarray:
        """[batch] whether the unmodified model's prediction is right (next-token: the share of positions)."""
        everything = np.arange(len(self.batch.length))
        original = self.original if self.task == "next-token" else torch.as_tensor(self.batch.stored_logits)
        return self.measure(original[None], everything)["correct"][0]


# The length up to which an intervened forward pass takes its full `forward_rows` rows. A pass's attention is
# rows x heads x L x L per layer (the scores, the probabilities and the injected copy of them are each that size):
# longer passes take fewer rows, so that rows x L² stays within forward_rows x REFERENCE_LENGTH² (at 512 positions,
# 64 rows become 4: 50 MB per attention tensor of MiniLM instead of 805 MB). benchmarks/causal_forward.py measures it.
REFERENCE_LENGTH = 128


def rows_per_pass(forward_rows: int, length: int) -> int:
    """The rows (targets x examples) of one intervened forward pass over `length` positions: `forward_rows` up to
    REFERENCE_LENGTH positions, beyond it as many as keep rows x length² within forward_rows x REFERENCE_LENGTH²
    (one at least)."""
    if length <= REFERENCE_LENGTH:
        return forward_rows
    return max(1, forward_rows * REFERENCE_LENGTH**2 // length**2)


def forward_groups(
    examples: np.ndarray, target_indices: Sequence[int], forward_rows: int, length: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(examples, targets) of one intervened forward pass each: every (target, example) pair exactly once, at most
    `rows_per_pass(forward_rows, L)` rows (targets x examples) per pass, L the longest of `examples` (`length`:
    [batch] the batch's lengths; None: `forward_rows` rows), as many targets per pass as fit (one at least).
    examples: [k] positions in the batch; target_indices: indices into the plan's targets."""
    examples = np.asarray(examples)
    if length is not None and len(examples):
        forward_rows = rows_per_pass(forward_rows, int(np.max(np.asarray(length)[examples])))
    for part in range(0, len(examples), forward_rows):
        chosen = examples[part : part + forward_rows]
        copies = max(1, forward_rows // len(chosen))
        for first in range(0, len(target_indices), copies):
            yield chosen, np.asarray(target_indices[first : first + copies])
