"""Model folders: safetensors + config.json round trip and one-line errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from fmct import hub
from fmct.config import load_config
from fmct.errors import CheckpointError
from fmct.models import ViT3DConfig, build_vit3d
from fmct.ssl.config import PretrainConfig

torch.set_num_threads(1)


def small_model(**overrides):
    settings = dict(size="tiny", img_size=(32, 32, 16), patch_size=(8, 8, 4), depth=2, n_registers=2)
    settings.update(overrides)
    torch.manual_seed(0)
    model = build_vit3d(ViT3DConfig(**settings))
    with torch.no_grad():  # move every parameter off its initial value, so that a missed one shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model.eval()


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    model = small_model()
    extra = {"windows_hu": [[40, 80], [80, 200], [600, 2800]], "step": 1200}
    hub.save(model, tmp_path / "export", extra=extra)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = hub.load(tmp_path / "export")
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(2, 3, 32, 32, 16)
    masks = torch.rand(2, 64) < 0.5
    with torch.no_grad():
        expected, got = model.forward_features(x, masks=masks), loaded.forward_features(x, masks=masks)
    for key in ("cls", "patch", "registers"):
        assert torch.equal(expected[key], got[key]), key
    assert hub.read_extra(tmp_path / "export") == extra
    # The loaded model is trainable (fine-tuning starts from it).
    assert all(param.requires_grad for param in loaded.parameters())
    loaded(x).sum().backward()
    assert loaded.patch_embed.proj.weight.grad is not None


def test_bad_folders_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing") as error:
        hub.load(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    folder = hub.save(small_model(), tmp_path / "model")

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable safetensors file") as error:
        hub.load(folder)
    assert str(folder / "model.safetensors") in str(error.value) and "\n" not in str(error.value)

    hub.save(small_model(depth=3), folder)
    info = json.loads((folder / "config.json").read_text())
    info["depth"] = 2  # config.json is flat: the architecture fields at the top level
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="weights do not match") as error:
        hub.load(folder)
    assert "\n" not in str(error.value)

    info["size"] = "gigantic"
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="invalid model config"):
        hub.load(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        hub.load(folder)


def test_save_refuses_unserialisable_extra_and_leaves_no_temp_files(tmp_path):
    model = small_model()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        hub.save(model, tmp_path, extra={"tensor": torch.zeros(1)})
    hub.save(model, tmp_path)
    hub.save(model, tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_the_shipped_foundation_checkpoint_loads_by_name_with_its_card_and_log():
    assert "fmct-synth-tiny" in hub.shipped_models()
    folder = hub.resolve_model_dir("fmct-synth-tiny")
    assert folder == hub.SHIPPED_DIR / "fmct-synth-tiny"
    model = hub.load(folder)
    # Made by the committed recipe: the architecture of pretrain_synth_tiny, the whole 64^3 volume through a
    # convolutional stem.
    recipe = load_config(PretrainConfig, "pretrain_synth_tiny").model
    assert model.config == recipe and tuple(model.config.img_size) == (64, 64, 64) and model.config.stem_channels
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    assert size_mb <= 25
    card = (folder / "README.md").read_text()
    for heading in (
        "## Data",
        "## Recipe and budget",
        "## Online evaluation during pretraining",
        "## Intended use",
        "## Limits",
    ):
        assert heading in card
    assert "site C" in card and hub.training_log("fmct-synth-tiny") == folder / "log.jsonl"
    extra = hub.read_extra(folder)
    assert extra["windows"] == [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]] and extra["method"] == "anomaly"
    # Shipped folders carry no path of the machine they were made on.
    recipe_values = [
        line.split(":", 1)[1].strip() for line in (folder / "recipe.yaml").read_text().splitlines() if ":" in line
    ]
    # The store by its bare name and manifest fingerprint (fmct.store.store_identity), never its path.
    assert extra["store"]["name"] == "store" and len(extra["store"]["manifest_sha256"]) == 64
    assert not any(value.startswith("/") for value in recipe_values)
