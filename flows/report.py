"""The report stage as a Prefect flow: causal results (+ their attention store) -> a folder with index.html and PNGs."""

from __future__ import annotations

from prefect import flow

from flows.preflight import check_writable_location
from storage_schemas.attention_store import use_chunk_codec_batches
from storage_schemas.remote import is_remote
from tasks.report import draw_report, read_report_inputs


@flow(name="effattn-report")
def report(results: str, out: str, store: str | None = None, examples: int = 3, explanations: str | None = None
           ) -> str:
    """Write `out/index.html` and its figures from the causal results at `results` (path or fsspec URL).

    `store`: the attention store the results came from (default: the results' `attention_store` attribute);
    `out`: a local folder (created if needed); `examples`: how many examples are drawn as attention heatmaps.
    `explanations`: explanation results (effattn explain) whose curves, table and claims the report shows too.
    Returns the path of index.html.
    """
    use_chunk_codec_batches()
    if is_remote(out):
        raise ValueError(f"--out must be a local folder, got {out}: write the report locally, then copy it")
    check_writable_location(out, "--out")  # not a file, nor under one; before the inputs are read
    inputs = read_report_inputs(results, store, examples, explanations)
    return draw_report(inputs, out)
