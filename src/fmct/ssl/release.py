"""Package a finished pretraining run as a shipped checkpoint: the teacher backbone (safetensors +
config.json), the run's log.jsonl and resolved config, and a model card (README.md) written from them.

``fmct release RUN --out OUT --name NAME --data "..." --command "..."`` (``make foundation``
calls it). A folder of ``src/fmct/weights/`` is loadable by name wherever a model folder is accepted
(:func:`fmct.hub.resolve_model_dir`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from fmct import hub
from fmct.atomic import atomic_write_text
from fmct.card import SYNTHETIC_DATASET, render_card
from fmct.errors import CheckpointError
from fmct.paths import without_machine_paths
from fmct.ssl.run_folder import BACKBONE_DIR, CONFIG_FILE, LOG_FILE
from fmct.tables import read_jsonl

RECIPE_FILE = "recipe.yaml"
METHOD_NAMES = {
    "dino": "DINO + iBOT + KoLeo",
    "mae": "masked autoencoding, MAE",
    "anomaly": "synthetic anomalies: local density changes painted in and found again, per patch and per scan",
}


def online_curve_table(records: list[dict]) -> str:
    """The online evaluation by step as a Markdown table: RankMe, then k-NN / linear AUROC per finding."""
    rows = [r for r in records if "online_rankme" in r]
    findings = sorted(
        {k.removeprefix("online_knn_auroc_") for r in rows for k in r if k.startswith("online_knn_auroc_")}
    )
    header = ["step", "RankMe"] + [f"{f} k-NN / linear" for f in findings]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["step"]), f"{r['online_rankme']:.1f}"]
        cells += [
            f"{r.get(f'online_knn_auroc_{f}', float('nan')):.3f} / "
            f"{r.get(f'online_linear_auroc_{f}', float('nan')):.3f}"
            for f in findings
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def online_change(records: list[dict]) -> str:
    """One sentence: each online figure at the last evaluation against its step-0 (random-init) value."""
    rows = [r for r in records if "online_rankme" in r]
    if len(rows) < 2:
        return "No online evaluation was logged."
    first, last = rows[0], rows[-1]
    keys = sorted(k for k in last if k.startswith("online_knn_auroc_"))
    changes = [f"{k.removeprefix('online_knn_auroc_')} {first.get(k, float('nan')):.3f} -> {last[k]:.3f}" for k in keys]
    return (
        f"From step 0 to step {last['step']}: RankMe {first['online_rankme']:.1f} -> {last['online_rankme']:.1f}; "
        f"k-NN AUROC {', '.join(changes)}."
    )


def wall_seconds(records: list[dict], global_batch: int) -> float:
    """Training wall time from the log: volumes between logged steps over the logged volumes/s."""
    total, previous = 0.0, 0
    for r in records:
        if "volumes_per_s" in r and r["volumes_per_s"] > 0:
            total += (r["step"] - previous) * global_batch / r["volumes_per_s"]
            previous = r["step"]
    return total


def model_card(name: str, run_dir: Path, data: str, command: str, machine: str, results: str = "") -> str:
    """The model card (Markdown) of run ``run_dir`` shipped as ``name``."""
    records = read_jsonl(run_dir / LOG_FILE)
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    optim, model = config["optim"], config["model"]
    steps = max(r["step"] for r in records)
    global_batch = optim["batch_size"]  # single-process run
    seconds = wall_seconds(records, global_batch)
    parameters = sum(t.numel() for t in hub.load(run_dir / BACKBONE_DIR).state_dict().values())
    last = [r for r in records if "loss" in r][-1]
    method = METHOD_NAMES[config.get("method", "dino")]
    stem = model.get("stem_channels") or []
    embedding = (
        f"a convolutional stem ({', '.join(map(str, stem))} channels, {len(stem)} stages each halving the grid) "
        "makes one token per patch"
        if stem
        else "a linear patch embedding"
    )
    losses = ", ".join(f"{key.removesuffix('_loss')} {last[key]:.3f}" for key in sorted(last) if key.endswith("_loss"))
    collapse = (
        f"; teacher head-output cosine between scans {last['teacher_cosine']:.3f} (1 = collapsed), teacher entropy "
        f"{last.get('teacher_entropy', float('nan')):.3f} nats"
        if "teacher_cosine" in last
        else ""
    )
    kinds = (
        "two logits, that it holds a focal hyperdense change and a hypodense one"
        if model.get("change_kinds", 1) == 2
        else "one logit, that it holds a focal density change"
    )
    features = (
        "- Features: the CLS token, the mean and max of the patch tokens and the change logit: the pretext's scan\n"
        f"  head (kept with the backbone) scoring the scan, {kinds} (`fmct embed` writes\n"
        "  all four; `fmct probe` chooses the change logit, CLS, CLS + mean or CLS + mean + max on the validation\n"
        "  split)."
        if model.get("change_heads")
        else "- Features: the CLS token and the mean and max of the patch tokens (`fmct embed` writes all three;\n"
        "  `fmct probe` chooses CLS, CLS + mean or CLS + mean + max on the validation split)."
    )
    model_text = f"""- ViT3D: {embedding}; {model["depth"]} blocks, width {model["embed_dim"]}, \
{model["n_heads"]} heads, patch {model["patch_size"]} voxels,
  input {model["img_size"]} voxels of {len(config["augment"]["windows"])} HU windows
  {config["augment"]["windows"]} (level, width), {model["n_registers"]} register token(s); {parameters:,} parameters.
- Expects the canonical grid of fmct's demo stores: 64^3 voxels of 3 mm (RAS), the whole volume
  resized to the input size (`fmct embed` and `fmct finetune` do so; `ViT3DModel.preprocess` in Python).
{features}"""
    recipe = f"""- Config: `{RECIPE_FILE}` (the resolved config of the run; the source is \
`fmct/configs/pretrain_synth_tiny.yaml`).
- Reproduce: `{command}`
- {steps:,} steps x {global_batch} volumes = {steps * global_batch:,} volume passes; \
{seconds / 60:.0f} min of training on {machine}.
- Last logged losses: total {last["loss"]:.3f} ({losses}){collapse}."""
    online = f"""The backbone's features (the teacher's, for DINO) of a separate labelled synthetic validation cohort
(never its test split): k-NN on the CLS token, and `fmct probe`'s linear probe with its feature choice,
fitted on one half and scored on the other, split by patient; step 0 is the random initialisation. Small
halves (about 78 scans each): differences under about 0.1 AUROC are noise.

{online_curve_table(records)}

{online_change(records)}"""
    limits = """- Trained only on procedural phantoms (MNI152-based anatomy, simulated scanners of two sites): features
  learned here need not transfer to real CT. Never use it for a clinical decision.
- Tiny model and CPU budget; at 3 mm voxels small lesions span one or two voxels.
- How it compares with training from scratch and with the random-init and HU-histogram floors is
  measured in fmct's BENCHMARKS.md and printed by `make demo`."""
    if config.get("method") == "anomaly":
        limits += """
- Its pretext (smooth hyperdense and hypodense ellipsoids painted into the soft tissue inside the head)
  is close to what fmct detects: acute blood is a hyperdense change, an infarct a hypodense one. No label
  was read, but the features favour focal density changes; findings of shape (a fracture line, a midline
  shift) and real bleeds of other shapes and textures than its ellipsoids need their own evidence."""
    return render_card(
        name,
        f"A self-supervised 3D ViT backbone for head CT from `fmct pretrain` ({method}), pretrained on **synthetic** "
        "head CT only. It exists so that fmct's demo, tests and tutorials have a real foundation checkpoint to "
        "fine-tune and probe; it is not a clinical model.",
        [
            ("Model", model_text),
            ("Data", data),
            ("Recipe and budget", recipe),
            ("Online evaluation during pretraining", online),
            ("Results", results or "Not measured yet."),
            (
                "Intended use",
                "Demonstrating and testing fmct's pipeline (embed, probe, fine-tune, evaluate, report) on "
                "synthetic cohorts; a starting point to compare recipes against.",
            ),
            ("Limits", limits),
        ],
        tags=["head-ct", "3d-vit", "medical-imaging", "self-supervised", "synthetic-data"],
        datasets=[SYNTHETIC_DATASET],
    )


def package(run_dir: Path, out_dir: Path, name: str, data: str, command: str, machine: str, results: str = "") -> Path:
    """Copy the run's backbone, log and config into ``out_dir`` and write its model card; return ``out_dir``."""
    backbone = hub.resolve_model_dir(run_dir)
    for needed in (run_dir / LOG_FILE, run_dir / CONFIG_FILE):
        if not needed.is_file():
            raise CheckpointError(f"{needed}: missing; not a finished pretraining run")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backbone / hub.WEIGHTS_FILE, out_dir / hub.WEIGHTS_FILE)
    shutil.copyfile(run_dir / LOG_FILE, out_dir / LOG_FILE)
    # A shipped folder leaves the machine: the run's folders (a name may be a patient's) become bare names.
    config = json.loads((backbone / hub.CONFIG_FILE).read_text())
    atomic_write_text(out_dir / hub.CONFIG_FILE, json.dumps(without_machine_paths(config), indent=2))
    recipe = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    atomic_write_text(out_dir / RECIPE_FILE, yaml.safe_dump(without_machine_paths(recipe), sort_keys=False))
    atomic_write_text(out_dir / "README.md", model_card(name, run_dir, data, command, machine, results))
    return out_dir
