"""What a pipeline run prints at its end: the efficient-attention diagnostics of each variant condensed into the
numbers that answer the claims (SEED.md), and plain-text tables.

Each (example, layer, head) attention block has one value per diagnostic (storage_schemas.efficient_store,
DIAGNOSTIC_ARRAYS); a summary says over how many blocks, and what share of them, a property holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# A block "rows sum to one" when max_i |sum_j A_eff[i, j] - 1| is at most this. The stored attention is float32,
# so even the original rows miss 1 by a few 1e-7.
ROW_SUM_TOLERANCE = 1e-5
# A block is "non-negative" when its negative mass (sum of |negative entries| / L) is at most this.
NEGATIVE_MASS_TOLERANCE = 1e-6


def summarize_variant(
    diagnostics: Mapping[str, np.ndarray],
    row_sum_tolerance: float = ROW_SUM_TOLERANCE,
    negative_mass_tolerance: float = NEGATIVE_MASS_TOLERANCE,
) -> dict[str, float]:
    """Condense one variant's diagnostics (name -> [example, layer, head]) into:

    blocks: number of (example, layer, head) blocks; with_null_space: share with a non-empty null space
    (null_dim > 0, where attention is not identifiable); mean_null_norm_ratio: mean ||A - A_eff||_F / ||A||_F;
    max_output_residual: largest ||A_eff T - A T||_F / ||A T||_F (the variant keeps the output when ~0);
    rows_sum_to_one, non_negative, probability_distribution (both): shares of blocks; converged: share of blocks
    whose solver converged (1 for closed-form variants).
    """
    row_sum_ok = np.asarray(diagnostics["row_sum_error"]) <= row_sum_tolerance
    non_negative = np.asarray(diagnostics["negative_mass"]) <= negative_mass_tolerance
    blocks = int(row_sum_ok.size)
    if blocks == 0:
        raise ValueError("no attention blocks to summarize: the diagnostics are empty")
    return {
        "blocks": blocks,
        "with_null_space": float(np.mean(np.asarray(diagnostics["null_dim"]) > 0)),
        "mean_null_norm_ratio": float(np.mean(diagnostics["null_norm_ratio"])),
        "max_output_residual": float(np.max(diagnostics["output_residual"])),
        "rows_sum_to_one": float(np.mean(row_sum_ok)),
        "non_negative": float(np.mean(non_negative)),
        "probability_distribution": float(np.mean(row_sum_ok & non_negative)),
        "converged": float(np.mean(np.asarray(diagnostics["converged"]).astype(bool))),
    }


SUMMARY_COLUMNS = (
    ("variant", None),
    ("blocks", "blocks"),
    ("null space", "with_null_space"),
    ("|A-Aeff|/|A|", "mean_null_norm_ratio"),
    ("max output residual", "max_output_residual"),
    ("rows sum to 1", "rows_sum_to_one"),
    ("non-negative", "non_negative"),
    ("probability dist.", "probability_distribution"),
    ("converged", "converged"),
)


def summary_table(summaries: Mapping[str, Mapping[str, float]]) -> str:
    """A text table of `summarize_variant` results, one row per variant; shares as percentages."""
    rows = []
    for variant, summary in summaries.items():
        row = [variant]
        for _, key in SUMMARY_COLUMNS[1:]:
            value = summary[key]
            if key == "blocks":
                row.append(str(int(value)))
            elif key in ("mean_null_norm_ratio", "max_output_residual"):
                row.append(f"{value:.3g}")
            else:
                row.append(f"{100 * value:.1f} %")
        rows.append(row)
    return text_table([header for header, _ in SUMMARY_COLUMNS], rows)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the headers."""
    widths = [len(header) for header in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells, the table has {len(headers)} columns: {list(row)}")
        widths = [max(width, len(str(cell))) for width, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])
