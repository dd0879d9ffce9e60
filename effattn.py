"""effattn's Python API: the names a notebook user needs, in one module (`import effattn`).

    open_store(url)                          an attention store as a zarr group (schema checked)
    efficient_attention(attention, value, w_out, length, causal)   efficient attention of arrays
    VARIANTS, Variant, variant_record, register_variant            the efficient-attention variants
    Explainer, explainer_record, register_explainer               the attribution methods (explanations)
    Intervention, intervention_matrices     what the causal stage injects, on arrays
    verify_store(url)                        read every chunk of a store and report damage
    extract, efficient, causal, explain, report   the stages (Prefect flows), each taking its settings object:
    ExtractSettings, EfficientSettings, CausalSettings, ExplainSettings, ReportSettings   (flows/settings.py)
    run_pipeline, PipelineSettings           the whole pipeline (extract -> efficient -> causal -> explain -> report)
    use_fast_codec_pipeline()                the zarrs codec pipeline for this process (the stages call it)

Each name is the object of its home module (analysis/, storage_schemas/, flows/), imported when first used, so
that `import effattn` is quick and loads torch or Prefect only for what is used. Importing changes no process-wide
setting.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_HOMES: dict[str, str] = {
    "open_store": "storage_schemas.attention_store",
    "efficient_attention": "analysis.efficient_attention",
    "VARIANTS": "analysis.variants",
    "Variant": "analysis.variants",
    "variant_record": "analysis.variants",
    "register_variant": "analysis.variants",
    "Explainer": "analysis.explainers",
    "explainer_record": "analysis.explainers",
    "register_explainer": "analysis.explainers",
    "Intervention": "analysis.interventions",
    "intervention_matrices": "analysis.interventions",
    "verify_store": "storage_schemas.verification",
    "extract": "flows.extract",
    "efficient": "flows.efficient",
    "causal": "flows.causal",
    "explain": "flows.explain",
    "report": "flows.report",
    "run_pipeline": "flows.pipeline",
    "ExtractSettings": "flows.settings",
    "EfficientSettings": "flows.settings",
    "CausalSettings": "flows.settings",
    "ExplainSettings": "flows.settings",
    "ReportSettings": "flows.settings",
    "PipelineSettings": "flows.settings",
    "use_fast_codec_pipeline": "storage_schemas.attention_store",
}
# the public name where it differs from the home module's
_NAMES_AT_HOME = {"open_store": "open_attention_store"}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'effattn' has no attribute {name!r}; its API: {', '.join(__all__)}")
    value = getattr(importlib.import_module(_HOMES[name]), _NAMES_AT_HOME.get(name, name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
