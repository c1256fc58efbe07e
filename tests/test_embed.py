"""fmct embed on small stores: one row per scan, determinism, resume from chunk files, equality with a
direct forward pass, a probe on the embeddings; plus the helpers the fine-tune tests share."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fmct import hub
from fmct.cli import main
from fmct.data import StoreVolumes
from fmct.data.batches import read_hu_batches
from fmct.eval.embed import EmbedConfig, embed_store
from fmct.eval.embeddings import read_embeddings
from fmct.eval.evaluate import read_predictions
from fmct.eval.probe import ProbeConfig, run_probe
from fmct.models import ViT3DConfig, build_vit3d
from fmct.models.windows import model_input
from fmct.store import Store, rebuild_tables, write_scan

torch.set_num_threads(1)

WINDOWS = [[40, 80], [80, 200], [600, 2800]]
TINY = dict(
    size="tiny",
    embed_dim=64,
    depth=2,
    n_heads=4,
    img_size=(32, 32, 32),
    patch_size=(8, 8, 8),
    n_registers=1,
    layerscale_init=None,
)
BLOB_HU, BLOB_RADIUS = 100.0, 10  # HU, voxels (15 mm at 1.5 mm): a large bright haematoma


def tiny_model(seed: int = 0, change_heads: bool = False):
    torch.manual_seed(seed)
    return build_vit3d(ViT3DConfig(**TINY, change_heads=change_heads)).eval()


def save_tiny_run(run: Path, seed: int = 0, change_heads: bool = False) -> Path:
    """A pretraining run folder holding ``backbone/`` of a tiny ViT (depth 2, dim 64, 32^3 input, patch 8)."""
    model = tiny_model(seed, change_heads)
    hub.save(model, run / "backbone", extra={"windows": WINDOWS})  # the key fmct pretrain writes
    return run


def write_blob_store(
    root: Path,
    n_scans: int = 36,
    size: int = 48,
    seed: int = 0,
    splits=None,
    sites=None,
    blob_hu: float = BLOB_HU,
    blob_radius: float = BLOB_RADIUS,
):
    """A store of ``size``^3 int16 heads (1.5 mm): skull 1000 HU, brain 35 HU, noise 8 HU; every other scan
    (in a random order) holds a bright blob (``blob_hu``, radius ``blob_radius`` voxels) somewhere in the brain.

    Writes ``root/labels.csv`` (scan_id, patient_id, site, split, ich) and returns (store path, ich labels).
    """
    rng = np.random.default_rng(seed)
    store = root / "store"
    grid = np.stack(np.meshgrid(*[np.arange(size) - (size - 1) / 2] * 3, indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.42, 0.46, 0.44])[:, None, None, None] / size) ** 2).sum(0))
    ich = rng.permutation(np.arange(n_scans) % 2)
    for i in range(n_scans):
        hu = np.full((size,) * 3, -1000.0)
        hu[radius < 1.0] = 1000.0
        hu[radius < 0.85] = 35.0
        if ich[i]:
            centre = rng.uniform(-8, 8, size=3)
            hu[np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < blob_radius] = blob_hu
        hu += rng.normal(0, 8, size=hu.shape)
        row = {
            "scan_id": f"s{i:03d}",
            "patient_key": f"p{i:03d}",
            "source": f"/data/scan{i}",
            "store_shape": [size] * 3,
            "store_spacing_mm": [1.5] * 3,
        }
        write_scan(store, np.round(hu).astype(np.int16), row)
    rebuild_tables(store)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scan_id", "patient_id", "site", "split", "ich"])
        for i in range(n_scans):
            writer.writerow([f"s{i:03d}", f"p{i:03d}", sites[i] if sites else "A", splits[i] if splits else "", ich[i]])
    return store, ich


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("blob")
    store, ich = write_blob_store(root, n_scans=24)
    return root, store, ich


def test_embed_one_row_per_scan_equal_to_a_direct_forward_pass(blob_store, tmp_path):
    root, store, _ = blob_store
    run = save_tiny_run(tmp_path / "run")
    summary = embed_store(
        run, store, tmp_path / "emb", EmbedConfig(batch_size=5, chunk_size=8, workers=2), progress=False
    )
    assert summary.n_embedded == 24 and summary.n_chunks == 3 and not summary.skipped  # chunk 8 -> 10 (two batches)
    embeddings = read_embeddings(tmp_path / "emb")
    assert embeddings.scan_ids.tolist() == [f"s{i:03d}" for i in range(24)]
    assert list(embeddings.features) == ["cls", "patch_mean", "patch_max"]
    assert all(values.shape == (24, 64) for values in embeddings.features.values())
    meta = embeddings.meta
    assert meta["model"] == "run" and meta["arm"] == "pretrained" and meta["windows_hu"] == WINDOWS
    assert meta["default_feature"] == "auto"
    assert (
        meta["checkpoint_sha256"] == hashlib.sha256((run / "backbone" / "model.safetensors").read_bytes()).hexdigest()
    )

    model = hub.load(run / "backbone")
    hu = torch.stack([torch.from_numpy(Store(store).read(f"s{i:03d}"))[None] for i in (0, 7, 23)])
    with torch.no_grad():
        tokens = model.forward_features(model_input(hu, 32, WINDOWS))
    rows = [0, 7, 23]
    np.testing.assert_allclose(embeddings.features["cls"][rows], tokens["cls"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        embeddings.features["patch_mean"][rows], tokens["patch"].mean(1).numpy(), rtol=1e-4, atol=1e-5
    )
    # patch_max: per channel, the largest of the 64 patch tokens (4^3 patches of 8^3 voxels).
    assert tokens["patch"].shape == (3, 64, 64)
    np.testing.assert_allclose(
        embeddings.features["patch_max"][rows], tokens["patch"].max(dim=1).values.numpy(), rtol=1e-4, atol=1e-5
    )
    assert (embeddings.features["patch_max"] > embeddings.features["patch_mean"]).all()

    again = embed_store(
        run, store, tmp_path / "emb2", EmbedConfig(batch_size=3, chunk_size=100, workers=1), progress=False
    )
    assert again.n_chunks == 1
    second = read_embeddings(tmp_path / "emb2")
    np.testing.assert_allclose(
        second.features["cls"], embeddings.features["cls"], rtol=1e-5, atol=1e-6
    )  # batch size is irrelevant
    first_bytes = (tmp_path / "emb" / "embeddings.npz").read_bytes()
    embed_store(run, store, tmp_path / "emb3", EmbedConfig(batch_size=5, chunk_size=8, workers=2), progress=False)
    assert (tmp_path / "emb3" / "embeddings.npz").read_bytes() == first_bytes  # deterministic to the bit


def test_embed_uses_the_windows_recorded_with_the_model(blob_store, tmp_path):
    _, store, _ = blob_store
    windows = [[30, 60], [100, 300], [400, 1800]]
    hub.save(tiny_model(), tmp_path / "model", extra={"windows": windows})
    embed_store(tmp_path / "model", store, tmp_path / "emb", EmbedConfig(batch_size=8), progress=False)
    cls = read_embeddings(tmp_path / "emb").features["cls"][:2]
    hu = torch.stack([torch.from_numpy(Store(store).read(f"s{i:03d}"))[None] for i in (0, 1)])
    model = hub.load(tmp_path / "model")
    with torch.no_grad():
        recorded, default = (model(model_input(hu, 32, w)).numpy() for w in (windows, WINDOWS))
    np.testing.assert_allclose(cls, recorded, rtol=1e-4, atol=1e-5)
    assert np.abs(cls - default).max() > 1e-2


def test_embed_resumes_from_finished_chunks_and_redoes_stale_ones(blob_store, tmp_path):
    root, store, _ = blob_store
    run = save_tiny_run(tmp_path / "run")
    config = EmbedConfig(batch_size=4, chunk_size=8, workers=1)
    embed_store(run, store, tmp_path / "emb", config, progress=False)
    chunk = tmp_path / "emb" / "chunks" / "chunk-00001.npz"
    reference = read_embeddings(tmp_path / "emb").features["cls"]
    # Mark chunks 0 and 2 as finished with recognisable values: a resumed run must keep them, not recompute.
    for k in (0, 2):
        path = tmp_path / "emb" / "chunks" / f"chunk-{k:05d}.npz"
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        arrays["cls"] = np.full_like(arrays["cls"], 7.0)
        np.savez(path, **arrays)
    chunk.unlink()  # chunk 1 "was killed" before it was written
    summary = embed_store(run, store, tmp_path / "emb", config, progress=False)
    assert summary.n_chunks_reused == 2
    cls = read_embeddings(tmp_path / "emb").features["cls"]
    assert np.all(cls[:8] == 7.0) and np.all(cls[16:] == 7.0)
    np.testing.assert_allclose(cls[8:16], reference[8:16], rtol=1e-6)

    # Another model makes every chunk stale: all are recomputed.
    other = save_tiny_run(tmp_path / "other", seed=1)
    summary = embed_store(other, store, tmp_path / "emb", config, progress=False)
    assert summary.n_chunks_reused == 0
    assert not np.any(read_embeddings(tmp_path / "emb").features["cls"] == 7.0)

    # A chunk written before embed wrote patch_max (no "features" in its fingerprint) is recomputed, not reused.
    path = tmp_path / "emb" / "chunks" / "chunk-00000.npz"
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name != "patch_max"}
    fingerprint = json.loads(str(arrays["fingerprint"]))
    assert fingerprint.pop("features") == ["cls", "patch_mean", "patch_max"]
    arrays["fingerprint"] = np.asarray(json.dumps(fingerprint, sort_keys=True))
    np.savez(path, **arrays)
    summary = embed_store(other, store, tmp_path / "emb", config, progress=False)
    assert summary.n_chunks_reused == 2 and read_embeddings(tmp_path / "emb").features["patch_max"].shape == (24, 64)


def test_unreadable_scan_is_skipped_with_a_reason(tmp_path):
    store, _ = write_blob_store(tmp_path, n_scans=6, size=16)
    Store(store).scan_file("s002").write_bytes(b"not a volume file")
    run = save_tiny_run(tmp_path / "run")
    summary = embed_store(run, store, tmp_path / "emb", EmbedConfig(batch_size=4, workers=2), progress=False)
    assert (
        summary.n_embedded == 5
        and summary.skipped[0][0] == "s002"
        and "s002.b2nd: cannot read" in summary.skipped[0][1]
    )
    assert "s002" not in read_embeddings(tmp_path / "emb").scan_ids.tolist()
    assert "s002" in (tmp_path / "emb" / "errors.csv").read_text()


def test_reader_yields_batches_in_order_with_exact_bytes(blob_store):
    _, store, _ = blob_store
    volumes = StoreVolumes(store)
    batches = [[3, 1], [0], [5, 4, 2]]
    for indices, batch in zip(batches, read_hu_batches(volumes, batches, workers=2)):
        assert batch.indices == indices and batch.hu.dtype == torch.int16 and not batch.failed
        for row, i in enumerate(indices):
            assert np.array_equal(batch.hu[row, 0].numpy(), Store(store).read(f"s{i:03d}"))


def test_probe_on_embeddings_of_the_blob_store_beats_chance(tmp_path):
    store, ich = write_blob_store(tmp_path, n_scans=48, seed=3)
    run = save_tiny_run(tmp_path / "run")
    code = main(
        [
            "embed",
            "--model",
            str(run),
            "--store",
            str(store),
            "--out",
            str(tmp_path / "emb"),
            "--batch-size",
            "8",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    summary = run_probe(
        tmp_path / "emb",
        str(tmp_path / "labels.csv"),
        tmp_path / "probe",
        ProbeConfig(features="concat", label_fractions=(1.0,), seeds=1),
        store_path=store,
    )
    assert summary.findings == ["ich"]
    columns = read_predictions(tmp_path / "probe").columns
    auc = roc_auc_score(columns["label"].astype(int), columns["score"].astype(float))
    assert auc > 0.75, auc


def test_embed_cli_reports_a_bad_model_folder_in_one_line(blob_store, tmp_path, capsys):
    _, store, _ = blob_store
    (tmp_path / "empty").mkdir()
    code = main(["embed", "--model", str(tmp_path / "empty"), "--store", str(store), "--out", str(tmp_path / "emb")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a model folder" in err
