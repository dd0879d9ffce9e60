"""flows/settings.py: one frozen settings object per command; the command line generated from them (flows/cli.py)
parses into them with their defaults; docs/CLI.md is their generated reference; the help texts that name lists
declared elsewhere (variants, scopes, minimality directions) name them as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from analysis.causal import SCOPES
from analysis.interventions import DEFAULT_MINIMALITY_DIRECTIONS
from analysis.variants import VARIANTS
from flows import settings as settings_module
from flows.cli import COMMANDS, build_parser, cli_reference, parse_settings
from flows.settings import (
    EXTRACTION_SHAPE,
    CausalSettings,
    EfficientSettings,
    ExtractSettings,
    PipelineSettings,
    ServeSettings,
    StudiesSettings,
    cli_spelling,
)

ROOT = Path(__file__).resolve().parents[1]
# the required options of each command, with placeholder values
REQUIRED = {
    "extract": ["--corpus", "c.csv", "--model", "m", "--store", "s.zarr"],
    "train": ["--corpus", "c.csv"],
    "efficient": ["--store", "s.zarr"],
    "causal": ["--store", "s.zarr", "--results", "r.zarr"],
    "explain": ["--store", "s.zarr", "--results", "x.zarr"],
    "inspect": ["s.zarr"],
    "report": ["--results", "r.zarr", "--out", "out"],
    "verify": ["s.zarr"],
    "unlock": ["s.zarr"],
    "run": [],
    "studies": [],
    "serve": ["--interval", "5"],
    "view": ["s.zarr"],
}


def test_every_command_has_its_settings_and_the_defaults_come_from_them():
    assert set(REQUIRED) == set(COMMANDS)
    for command, (_, settings_classes) in COMMANDS.items():
        _, parsed = parse_settings([command, *REQUIRED[command]])
        assert tuple(type(item) for item in parsed) == settings_classes
        for item in parsed:
            for name, field in type(item).model_fields.items():
                if not field.is_required() and cli_spelling(field).get("cli", True) and name not in ("interval",):
                    assert getattr(item, name) == field.default, (command, name)


def test_settings_are_frozen_and_refuse_unknown_or_invalid_values():
    settings = EfficientSettings(store="s.zarr")
    with pytest.raises(ValidationError, match="frozen"):
        settings.store = "other.zarr"
    with pytest.raises(ValidationError, match="simplex_max_iteration"):
        EfficientSettings(store="s.zarr", simplex_max_iteration=10)  # misspelt: not silently ignored
    with pytest.raises(ValidationError, match="greater than 0"):
        ExtractSettings(corpus="c", model="m", store="s", max_length=0)
    with pytest.raises(ValidationError, match="'float32' or 'float16'"):
        ExtractSettings(corpus="c", model="m", store="s", dtype="float64")
    assert CausalSettings(store="s", results="r", scopes=["all"]).scopes == ("all",)  # lists become tuples


def test_the_simplex_defaults_are_declared_once():
    for settings_class in (EfficientSettings, PipelineSettings):
        fields = settings_class.model_fields
        assert (fields["simplex_max_iterations"].default, fields["simplex_tolerance"].default) == (200, 1e-10)
    assert EfficientSettings(store="s").recorded() == {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}
    text = Path(settings_module.__file__).read_text()
    assert text.count("option(200,") == 1 and text.count("1e-10") == 1
    cli = (ROOT / "flows" / "cli.py").read_text() + (ROOT / "flows" / "pipeline.py").read_text()
    assert "200" not in cli and "1e-10" not in cli


def test_run_sets_scopes_and_minimality_directions_and_every_pipeline_option():
    _, (settings,) = parse_settings(
        [
            "run",
            "--scopes",
            "all,layer",
            "--minimality-k",
            "1,2",
            "--all",
            "--all-scope-examples",
            "--no-train",
            "--cache",
            "c",
        ]
    )
    assert (settings.scopes, settings.minimality_directions) == (("all", "layer"), (1, 2))
    assert (settings.limit, settings.scope_examples, settings.train, settings.cache_root) == (None, None, False, "c")
    run_options = {action.dest for action in build_parser().command_parsers["run"]._actions} - {"help"}
    assert run_options == set(PipelineSettings.model_fields)
    serve_options = {action.dest for action in build_parser().command_parsers["serve"]._actions} - {"help"}
    assert serve_options == set(PipelineSettings.model_fields) | set(ServeSettings.model_fields)


def test_bad_values_are_refused_by_the_command(capsys):
    for argv, message in (
        (["efficient", "--store", "s", "--workers", "0"], "argument --workers: must be a positive integer, got 0"),
        (
            ["causal", "--store", "s", "--results", "r", "--minimality-k", "1,x"],
            "argument --minimality-k: must be comma-separated positive integers, got '1,x'",
        ),
        (["run", "--simplex-tolerance", "-1"], "argument --simplex-tolerance: must be a positive number, got -1"),
        (["extract", "--corpus", "c", "--model", "m"], "the following arguments are required: --store"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse_settings(argv)
        assert exited.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"effattn {argv[0]}: error: {message}"


def test_the_help_shows_choices_defaults_and_the_old_value_names():
    parsers = build_parser().command_parsers
    extract = parsers["extract"].format_help()
    assert "--device {cpu,cuda}" in extract and "--dtype {float32,float16}" in extract
    assert "truncate texts to this many tokens (default 128)" in " ".join(extract.split())
    assert "--ig-steps IG_STEPS" in parsers["explain"].format_help()
    assert "--minimality-k MINIMALITY_K" in parsers["causal"].format_help()
    assert "usage: effattn inspect [-h] store" in parsers["inspect"].format_help()


def test_help_names_the_lists_declared_elsewhere_as_they_are():
    fields = PipelineSettings.model_fields
    assert ",".join(VARIANTS) in fields["variants"].description
    assert ",".join(SCOPES) in fields["scopes"].description
    assert ",".join(map(str, DEFAULT_MINIMALITY_DIRECTIONS)) in fields["minimality_directions"].description
    studies = StudiesSettings.model_fields["studies"].description
    from analysis.studies import STUDIES

    assert ",".join(STUDIES) in studies


def test_the_pipeline_hands_its_options_to_the_stages():
    pipeline = PipelineSettings(
        corpus="c.csv",
        model="m",
        limit=5,
        max_length=16,
        seed=3,
        split="all",
        workers=2,
        simplex_tolerance=1e-8,
        scopes=["all"],
        minimality_directions=[1],
        batch_size=4,
    )
    extract = pipeline.extract_settings("s.zarr", "trained", "held_out")
    assert (
        extract.store,
        extract.model,
        extract.split,
        extract.limit,
        extract.max_length,
        extract.seed,
        extract.batch_size,
    ) == ("s.zarr", "trained", "held_out", 5, 16, 3, 4)
    efficient = pipeline.efficient_settings("s.zarr", ("effective",))
    assert (efficient.workers, efficient.recorded()["simplex_tolerance"]) == (2, 1e-8)
    causal = pipeline.causal_settings("s.zarr", "r.zarr", ("effective",))
    assert (causal.scopes, causal.minimality_directions, causal.batch_size) == (("all",), (1,), 4)
    assert (causal.seed, causal.model) == (0, None)  # the noise seed and the stored model, not the extraction's
    assert set(pipeline.extraction_shape()) == set(EXTRACTION_SHAPE)


def test_the_generated_reference_is_up_to_date():
    reference = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    assert reference == cli_reference() + "\n", "docs/CLI.md is stale: python -m flows.cli --reference > docs/CLI.md"
    for command in COMMANDS:
        assert f"## effattn {command}\n" in reference
    assert "| `--minimality-k` | list of positive int | - |" in reference
