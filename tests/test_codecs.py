"""Compressed DICOM decodes with permissively licensed codecs alone; GPL ones are an optional extra."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import tomllib

from fmct.io import read_series

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
GPL = re.compile(r"\b(A?GPL|GNU General Public|GNU Affero)", re.IGNORECASE)

# Run before pydicom is imported: as if pylibjpeg-libjpeg (GPL-3) were not installed, so that pydicom
# finds neither its module nor its pylibjpeg plugin entry point.
WITHOUT_GPL = """
import importlib.abc, importlib.metadata as metadata, sys

class NoGPL(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "libjpeg":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, NoGPL())
entry_points = metadata.entry_points
metadata.entry_points = lambda **selection: (
    metadata.EntryPoints(ep for ep in entry_points(**selection) if not ep.value.startswith("libjpeg"))
    if selection else entry_points())
"""
READ_ALL = """
import numpy as np
from fmct.io import read_series
folders = sys.argv[1:-1]
np.savez(sys.argv[-1], **{str(i): read_series(folder).hu for i, folder in enumerate(folders)})
assert "libjpeg" not in sys.modules
"""
CT = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
# The NM images carry no patient geometry: give them an axial one.
AXIAL = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ImagePositionPatient": [0, 0, 0], "PixelSpacing": [1, 1]}
# Lossless test files: a real CT slice in JPEG 2000, and other real images of each syntax labelled as CT.
# (JPEG extended 12-bit has no permissive decoder in pydicom: its gdcm plugin refuses 12-bit samples.)
SYNTAXES = [
    "693_J2KR.dcm",  # JPEG 2000 lossless, a head CT slice
    "JPEG-LL.dcm",  # JPEG lossless, process 14 selection value 1: the commonest in CT archives
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_RLE.dcm",  # RLE lossless
]


def _licence_text(distribution: str) -> str:
    meta = importlib.metadata.metadata(distribution)
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return " ".join([meta.get("License-Expression") or "", (meta.get("License") or "")[:200], *classifiers])


def test_core_dependencies_carry_no_gpl_and_the_gpl_codec_is_an_extra():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    core = [re.split(r"[<>=!~\[ ;]", spec)[0] for spec in project["dependencies"]]
    assert "pylibjpeg-libjpeg" not in core and {
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "pyjpegls",
        "python-gdcm",
    } <= set(core)
    assert project["optional-dependencies"]["gpl-codecs"] == ["pylibjpeg-libjpeg>=2.2"]
    licensed_gpl = [name for name in core if GPL.search(_licence_text(name))]
    assert licensed_gpl == []
    # The check does see a GPL licence, in each form PyPI metadata gives one (libjpeg's among them).
    for gpl in (
        "License :: OSI Approved :: GNU General Public License v3 (GPLv3)",
        "GPL-3.0-or-later",
        "AGPL-3.0-only",
    ):
        assert GPL.search(gpl), gpl


def test_every_compressed_syntax_decodes_without_the_gpl_codec(real_slice_series, tmp_path):
    folders = [
        real_slice_series(name, n_slices=3, spacing_mm=2.0, tags=CT | (AXIAL if name.startswith("JPEG") else {}))
        for name in SYNTAXES
    ]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_GPL + READ_ALL, *map(str, folders), str(tmp_path / "hu.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "hu.npz") as decoded:
        for index, (name, folder) in enumerate(zip(SYNTAXES, folders)):
            reference = read_series(folder).hu  # with whichever decoders this environment has
            permissive = decoded[str(index)]
            assert permissive.shape == reference.shape and np.ptp(reference) > 100, name
            np.testing.assert_array_equal(permissive, reference, err_msg=name)
