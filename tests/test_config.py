"""Configs: defaults, YAML, dotted overrides, clear errors, resolved config written back."""

import pytest
import yaml

from fmct.config import ConfigError, IngestConfig, load_config, save_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "ingest.yaml"
    path.write_text("canonical:\n  spacing_mm: 1.0\nselection:\n  min_slices: 10\n")
    config = load_config(IngestConfig, path, ["canonical.shape=[96,96,96]", "selection.series=all", "canonical.spacing_mm=2"])
    assert config.canonical.spacing_mm == 2.0 and isinstance(config.canonical.spacing_mm, float)
    assert config.canonical.shape == (96, 96, 96)
    assert config.selection.min_slices == 10 and config.selection.series == "all"
    assert config.selection.max_gap_ratio == 1.5  # untouched default


def test_resolved_config_round_trips(tmp_path):
    config = load_config(IngestConfig, None, ["salt=abc", "canonical.antialias=false"])
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["canonical"]["antialias"] is False
    assert load_config(IngestConfig, tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("canonical.spacing=1", "unknown config key canonical.spacing"),
        ("canonical.shape=[1,2]", "expected 3 values"),
        ("selection.min_slices=many", "expected int"),
        ("nonsense", "is not key=value"),
    ],
)
def test_bad_overrides_say_why(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(IngestConfig, None, [override])
