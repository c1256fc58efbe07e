"""Configs: defaults, YAML, dotted overrides, clear errors, resolved config written back."""

import pytest
import yaml

from fmct.config import IngestConfig, load_config, save_config
from fmct.errors import ConfigError


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "ingest.yaml"
    path.write_text("canonical:\n  spacing_mm: 1.0\nselection:\n  min_slices: 10\n")
    config = load_config(
        IngestConfig, path, ["canonical.shape=[96,96,96]", "selection.series=all", "canonical.spacing_mm=2"]
    )
    assert config.canonical.spacing_mm == 2.0 and isinstance(config.canonical.spacing_mm, float)
    assert config.canonical.shape == (96, 96, 96)
    assert config.selection.min_slices == 10 and config.selection.series == "all"
    assert config.selection.max_gap_ratio == 1.5  # untouched default


def test_resolved_config_round_trips(tmp_path):
    config = load_config(IngestConfig, None, ["source_map=false", "canonical.antialias=false"])
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


def test_a_scalar_fills_a_tuple_of_one_element_type():
    from fmct.ssl.config import PretrainConfig

    config = load_config(
        PretrainConfig,
        None,
        ["model.patch_size=8", "model.img_size=32", "augment.global_size=32", "augment.local_size=16"],
    )
    assert config.model.patch_size == (8, 8, 8) and config.model.img_size == (32, 32, 32)
    config = load_config(IngestConfig, None, ["canonical.shape=96"])
    assert config.canonical.shape == (96, 96, 96)
    with pytest.raises(ConfigError, match="expected 3 values"):
        load_config(IngestConfig, None, ["canonical.shape=[96, 96]"])


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads 1e-6 as a string; a float field takes it as the number it means.
    assert load_config(IngestConfig, None, ["canonical.spacing_mm=5e-1"]).canonical.spacing_mm == 0.5
    with pytest.raises(ConfigError, match="expected float"):
        load_config(IngestConfig, None, ["canonical.spacing_mm=fine"])


def test_overriding_one_key_keeps_a_sections_own_defaults():
    from dataclasses import dataclass, field

    from fmct.config import CanonicalConfig

    @dataclass
    class Outer:
        canonical: CanonicalConfig = field(default_factory=lambda: CanonicalConfig(spacing_mm=3.0, shape=(64, 64, 64)))

    config = load_config(Outer, None, ["canonical.antialias=false"])
    assert config.canonical.spacing_mm == 3.0 and config.canonical.shape == (64, 64, 64)
    assert config.canonical.antialias is False


def test_derived_values_follow_an_override():
    from dataclasses import dataclass, field

    from fmct.models import ViT3DConfig

    @dataclass
    class Outer:
        model: ViT3DConfig = field(default_factory=ViT3DConfig)

    assert load_config(Outer, None, ["model.size=tiny"]).model.embed_dim == 192


@pytest.mark.parametrize(
    "config_class, override, message",
    [
        ("fmct.ssl.config:PretrainConfig", "dino.centering=mean", "dino: centering must be one of"),
        ("fmct.ssl.config:PretrainConfig", "ibot.mask_ratio=[0.6,0.2]", "ibot: mask_ratio"),
        ("fmct.ssl.config:PretrainConfig", "engine.log_every=0", "engine: checkpoint_every and log_every"),
        ("fmct.ssl.config:PretrainConfig", "online_eval.knn_k=0", "online_eval: every must be"),
        ("fmct.ssl.config:PretrainConfig", "optim.epochs=0", "optim: batch_size and epoch_length"),
        ("fmct.ssl.config:PretrainConfig", "data.exclude_sites=[C]", "data: exclude_sites needs labels"),
        ("fmct.ssl.config:PretrainConfig", "model.size=huge", "model: unknown ViT size"),
        ("fmct.ssl.config:PretrainConfig", "augment.blur_prob=2", "augment: probabilities"),
        ("fmct.eval.probe:ProbeConfig", "method=svm", "probe method 'svm'"),
        ("fmct.eval.probe:ProbeConfig", "label_fractions=[0,1]", "label_fractions must lie in"),
        ("fmct.eval.finetune:FinetuneConfig", "head=mlp", "head 'mlp'"),
        ("fmct.eval.embed:EmbedConfig", "chunk_size=0", "chunk_size"),
        ("fmct.demo:DemoConfig", "test_fraction=0.9", "val_fraction and test_fraction > 0 with a sum below 1"),
    ],
)
def test_every_config_checks_its_fields_where_they_are_declared(config_class, override, message):
    """One style everywhere: a section's __post_init__ raises ConfigError; load_config names the section."""
    import importlib

    module, _, name = config_class.partition(":")
    with pytest.raises(ConfigError, match=message):
        load_config(getattr(importlib.import_module(module), name), None, [override])
