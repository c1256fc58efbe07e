"""``fmct export``: a detector as one ONNX file, for runtimes without PyTorch.

The graph is the whole :class:`fmct.detector.Detector` after preprocessing: input ``hu``, float32
(batch, 1, X, Y, Z) HU of the scan on the detector's canonical grid (what :func:`fmct.preprocess.canonical`
returns, as float; X, Y, Z as the detector's ``config.json`` records ``canonical.shape``); inside the
graph the resize to the model input, the HU windows, the backbone, the heads and the Platt calibration;
output ``probability``, float32 (batch, F) for the detector's findings, in their order. The batch axis is
dynamic. The findings, operating points (thresholds in probability and logit) and grid travel in the
model's metadata (``fmct_detector``: the detector's ``config.json``), so a deployment needs nothing else.

HU in, not windowed channels, so that the windows the detector was trained with cannot be got wrong.
Exporting needs the ``export`` extra (``pip install "fmct[export]"``: onnx, onnxscript, onnxruntime);
after writing, the file is checked with ONNX Runtime against PyTorch on a test scan.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from fmct import detector as detectors
from fmct.atomic import atomic_write_bytes
from fmct.errors import UsageError

INPUT_NAME = "hu"
OUTPUT_NAME = "probability"
TOLERANCE = 1e-3  # largest |onnxruntime - torch| probability accepted on the check scan
OPSET = 18


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(f'fmct export needs {module}: pip install "fmct[export]"') from None


def export_onnx(
    model: str | os.PathLike, out: str | os.PathLike, fit: str | None = None, check_hu: np.ndarray | None = None
) -> dict:
    """Write the detector of ``model`` (a detector folder or a probe/finetune output, ``fit`` naming a
    fit) to the ONNX file ``out`` (atomically, after the check) and return the check's figures.

    The check runs ONNX Runtime and PyTorch (fp32, CPU) on ``check_hu`` (float32 (B, 1, X, Y, Z) canonical
    HU; default: two synthetic heads) and raises :class:`UsageError` when a probability differs by more
    than :data:`TOLERANCE`.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    _require("onnxscript")
    folder = detectors.resolve_detector(model, fit)
    detector = detectors.load_detector(folder, "cpu")
    shape = tuple(detector.config["canonical"]["shape"])
    example = torch.full((2, 1, *shape), -1000.0)
    # The exporter's notes (optional torchvision ops, deprecations, tracing) are not the user's concern.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(scratch) / "detector.onnx"
        program = torch.onnx.export(
            detector,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"hu": {0: torch.export.Dim("batch", min=1)}},
            opset_version=OPSET,
            verbose=False,
        )
        program.save(str(path))
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(
            proto, {"fmct_detector": json.dumps(detector.config), "findings": ",".join(detector.findings)}
        )
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    check_hu = _check_scans(shape) if check_hu is None else np.asarray(check_hu, dtype=np.float32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    runtime = session.run([OUTPUT_NAME], {INPUT_NAME: check_hu})[0]
    with torch.no_grad():
        reference = detector(torch.from_numpy(check_hu)).numpy()
    difference = float(np.max(np.abs(runtime - reference)))
    if not difference <= TOLERANCE:
        raise UsageError(f"{out}: not written: ONNX Runtime differs from PyTorch by {difference:.2g} (> {TOLERANCE:g})")
    atomic_write_bytes(Path(out), data)
    return {
        "path": str(out),
        "detector": str(folder),
        "findings": detector.findings,
        "input_shape": ["batch", 1, *shape],
        "max_abs_difference": difference,
        "check_batch": int(check_hu.shape[0]),
        "bytes": len(data),
    }


def _check_scans(shape: tuple[int, int, int]) -> np.ndarray:
    """Two float32 canonical heads (1, X, Y, Z) of ``shape``: skull 1000 HU, brain 35 HU with 8 HU noise,
    one with a 70 HU blob; enough to exercise every window and the resize."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / n for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0)) / 0.44
    heads = []
    for blob in (False, True):
        hu = np.where(radius < 1.0, 1000.0, -1000.0)
        hu[radius < 0.85] = 35.0
        if blob:
            hu[np.sqrt(((grid - 0.1) ** 2).sum(0)) < 0.08] = 70.0
        heads.append(hu + rng.normal(0, 8, size=shape))
    return np.stack(heads)[:, None].astype(np.float32)
