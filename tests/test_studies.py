"""flows.studies: each study's pipeline arguments, and the page that answers the claims across studies."""

from __future__ import annotations

from analysis.report_html import write_studies_page
from flows.studies import study_pipeline_arguments


def test_study_arguments_follow_the_study_definitions():
    assert study_pipeline_arguments("bbc-topic", 50, "runs/s") == {
        "corpus": "bbc-topic", "model": "minilm", "limit": 50, "run_dir": "runs/s", "max_length": 128,
        "task": "classification", "epochs": 2,
    }
    political = study_pipeline_arguments("political-party", 50, "runs/s")
    assert political["max_length"] == 160 and political["epochs"] == 3
    # the decoder study trains nothing and reads held-out BBC text
    assert study_pipeline_arguments("next-token", 8, "runs/s") == {
        "corpus": "bbc-topic", "model": "smollm2", "limit": 8, "run_dir": "runs/s", "max_length": 128,
        "task": "next-token", "split": "held_out",
    }


def test_studies_page_has_every_verdict_and_links_each_report(tmp_path):
    (tmp_path / "rt-report").mkdir()
    rows = [{"claim": "sufficient (effective)", "rt": {"verdict": "holds", "measured": "agreement 100.00 %"}},
            {"claim": "minimal (effective)", "rt": {"verdict": "does not hold", "measured": "k=1: 100.00 %"}}]
    page = write_studies_page(tmp_path, rows, {
        "rt": {"description": "rt-sentiment", "report": str(tmp_path / "rt-report" / "index.html"), "examples": 8},
        "lm": {"description": "next-token", "report": str(tmp_path / "lm-report" / "index.html"), "examples": 8},
    })
    text = page.read_text()
    assert '<td class="holds"><b>holds</b><br><span class="note">agreement 100.00 %</span></td>' in text
    assert '<td class="fails"><b>does not hold</b>' in text
    assert text.count('<td class="unknown">not measured</td>') == 2  # lm measured neither claim
    assert '<a href="rt-report/index.html">rt</a>' in text
