"""The report stage as a Prefect flow: causal results (+ their attention store) -> a folder with index.html and PNGs."""

from __future__ import annotations

from prefect import flow

from flows.preflight import check_writable_location
from flows.settings import ReportSettings
from storage_schemas.attention_store import use_fast_codec_pipeline
from storage_schemas.remote import is_remote
from tasks.report import draw_report, read_report_inputs


@flow(name="effattn-report")
def report(settings: ReportSettings) -> str:
    """Write `out/index.html` and its figures from the causal results at `results` (path or fsspec URL); the
    names are the fields of `settings` (flows.settings.ReportSettings).

    `store`: the attention store the results came from (default: the results' `attention_store` attribute);
    `out`: a local folder (created if needed); `examples`: how many examples are drawn as attention heatmaps.
    `explanations`: explanation results (effattn explain) whose curves, table and claims the report shows too.
    Returns the path of index.html.
    """
    use_fast_codec_pipeline()
    out = settings.out
    if is_remote(out):
        raise ValueError(f"--out must be a local folder, got {out}: write the report locally, then copy it")
    check_writable_location(out, "--out")  # not a file, nor under one; before the inputs are read
    inputs = read_report_inputs(settings.results, settings.store, settings.examples, settings.explanations)
    return draw_report(inputs, out)
