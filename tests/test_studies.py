"""flows.studies: each study's pipeline arguments, and the page that answers the claims across studies."""

from __future__ import annotations

from analysis.report_html import write_studies_page
from flows.studies import study_pipeline_arguments


def test_study_arguments_follow_the_study_definitions():
    assert study_pipeline_arguments("bbc-topic", 50, "runs/s") == {
        "corpus": "bbc-topic",
        "model": "minilm",
        "limit": 50,
        "run_dir": "runs/s",
        "max_length": 128,
        "task": "classification",
        "epochs": 2,
    }
    political = study_pipeline_arguments("political-party", 50, "runs/s")
    assert political["max_length"] == 160 and political["epochs"] == 3
    # the decoder study trains nothing and reads held-out BBC text
    assert study_pipeline_arguments("next-token", 8, "runs/s") == {
        "corpus": "bbc-topic",
        "model": "smollm2",
        "limit": 8,
        "run_dir": "runs/s",
        "max_length": 128,
        "task": "next-token",
        "split": "held_out",
    }


def test_studies_page_has_every_verdict_and_links_each_report(tmp_path):
    (tmp_path / "rt-report").mkdir()
    rows = [
        {"claim": "sufficient (effective)", "rt": {"verdict": "holds", "measured": "agreement 100.00 %"}},
        {"claim": "minimal (effective)", "rt": {"verdict": "does not hold", "measured": "k=1: 100.00 %"}},
    ]
    page = write_studies_page(
        tmp_path,
        rows,
        {
            "rt": {"description": "rt-sentiment", "report": str(tmp_path / "rt-report" / "index.html"), "examples": 8},
            "lm": {"description": "next-token", "report": str(tmp_path / "lm-report" / "index.html"), "examples": 8},
        },
    )
    text = page.read_text()
    assert '<td class="holds"><b>holds</b><br><span class="note">agreement 100.00 %</span></td>' in text
    assert '<td class="fails"><b>does not hold</b>' in text
    assert text.count('<td class="unknown">not measured</td>') == 2  # lm measured neither claim
    assert '<a href="rt-report/index.html">rt</a>' in text


def test_studies_page_answers_the_explanation_question_from_the_stored_comparisons(tmp_path):
    """The table shows each study's stored comparisons as they are (nothing recomputed): a sentinel number
    written into one comes out on the page."""

    def comparison(variant, baseline, mean, low, high, n, answer):
        return {
            "method": f"{variant}:rollout",
            "twin": "attention:rollout",
            "variant": variant,
            "aggregation": "rollout",
            "baseline": baseline,
            "mean": mean,
            "low": low,
            "high": high,
            "n": n,
            "not_testable": 3,
            "efficient_aopc": 0.2,
            "twin_aopc": 0.1,
            "answer": answer,
        }

    studies = {
        "rt": {
            "description": "rt-sentiment",
            "report": str(tmp_path / "rt" / "index.html"),
            "examples": 8,
            "comparisons": [
                comparison("simplex", "raw attention", 0.1234, 0.05, 0.2, 41, "more faithful"),
                comparison("simplex", "norm-based attention", -0.0042, -0.01, 0.002, 41, "no difference detected"),
            ],
        },
        "lm": {
            "description": "next-token",
            "report": str(tmp_path / "lm" / "index.html"),
            "examples": 8,
            "comparisons": [comparison("effective", "raw attention", 0.0, None, None, 4, "not testable (n = 4)")],
        },
    }
    text = write_studies_page(tmp_path, [], studies).read_text()
    assert "<b>more faithful</b><br>+0.1234 [+0.0500, +0.2000], n = 41" in text
    assert "<b>no difference detected</b><br>-0.0042 [-0.0100, +0.0020], n = 41" in text
    assert "<b>not testable (n = 4)</b><br>—, n = 4" in text
    assert text.index("more faithful") < text.index("<h2>The claims of SEED.md")  # the answer comes first
