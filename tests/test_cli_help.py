"""`fmct --help`, `fmct <verb> --help` and `fmct --version`: every option says what it does and its default."""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

from fmct.cli import build_parser, main
from fmct.eval.embed import EmbedConfig
from fmct.eval.finetune import FinetuneConfig
from fmct.eval.probe import ProbeConfig

# The verbs of the real parser, by name (argparse has no public accessor for them).
VERBS: dict[str, argparse.ArgumentParser] = next(
    action.choices for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
)


def _help_output(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``fmct argv`` prints, for an argv that prints and exits 0 (--help, --version)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 0
    return capsys.readouterr().out


def _option_entries(help_text: str) -> dict[str, str]:
    """Each option's entry of a help page (invocation and help, whitespace collapsed), by its option strings."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        if line.startswith("  -"):  # an entry's first line: "  --out OUT   help..."
            current = [line]
            invocation = re.split(r"\s{2,}", line.strip())[0]
            for option in invocation.split(", "):
                entries[option.split()[0]] = current
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in entries.items()}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_option_of_every_verb_names_its_default(verb, capsys):
    parser = VERBS[verb]
    entries = _option_entries(_help_output([verb, "--help"], capsys))
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{verb} {action.option_strings or action.dest}: no help text"
        if not action.option_strings:
            continue  # a positional: SRC, DIR, key=value
        entry = entries[action.option_strings[0]]
        if action.required:
            assert "(required)" in entry, entry
        elif action.nargs != 0:  # a switch is off unless given: its help says what it does
            assert "(default: " in entry, f"fmct {verb} --help does not name the default of {entry!r}"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_shows_an_example(verb):
    description = VERBS[verb].description
    assert re.search(rf"^example:\n  fmct {verb} ", description, re.M), description


@pytest.mark.parametrize(
    ("verb", "option", "value"),
    [
        ("probe", "--seeds", ProbeConfig().seeds),
        ("finetune", "--seeds", FinetuneConfig().seeds),
        ("probe", "--label-fractions", ProbeConfig().label_fractions),
        ("embed", "--batch-size", EmbedConfig().batch_size),
    ],
)
def test_defaults_that_live_in_a_config_are_read_from_it(verb, option, value, capsys):
    spelled = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    entry = _option_entries(_help_output([verb, "--help"], capsys))[option]
    assert f"(default: {spelled})" in entry


def test_version_is_the_installed_packages(capsys):
    assert _help_output(["--version"], capsys) == f"fmct {importlib.metadata.version('fmct')}\n"


def test_top_level_help_lists_the_exit_codes(capsys):
    text = _help_output(["--help"], capsys)
    for code, meaning in [(0, "done"), (1, "failure"), (2, "usage or config error"), (130, "interrupted")]:
        assert re.search(rf"^ +{code} +{meaning}", text, re.M), f"exit status {code} not in fmct --help"


def test_quiet_keeps_warnings_and_errors_and_hides_progress_verbose_adds_debug(tmp_path, capsys):
    import logging

    from fmct.log import logger, progress_bar

    # An error through the one logger: one line on stderr, whatever the loudness.
    assert main(["--quiet", "predict", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("fmct predict: ")
    assert progress_bar(range(3)).disable and not logger.isEnabledFor(logging.INFO)
    logger.warning("a warning")
    logger.info("an info line")
    err = capsys.readouterr().err
    assert "a warning" in err and "an info line" not in err

    main(["--verbose", "predict", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "x"])
    logger.debug("a debug line")
    assert "a debug line" in capsys.readouterr().err and not progress_bar(range(3)).disable
    main(["predict", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "x"])  # back to the default
    assert logger.isEnabledFor(logging.INFO) and not logger.isEnabledFor(logging.DEBUG)
