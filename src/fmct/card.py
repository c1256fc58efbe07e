"""Model cards: the one writer of the README.md of every folder fmct ships (backbones, detectors,
released checkpoints), in the Hugging Face Hub's convention.

A card is YAML front matter (the Hub's metadata: ``license``, ``library_name``, ``tags``, ``datasets``,
``base_model``, ``model-index`` with the measured metrics) between ``---`` lines, then Markdown: a title,
a lead paragraph and ``##`` sections (model, data, recipe, metrics, intended use, limits).
"""

from __future__ import annotations

import yaml

LICENSE = "apache-2.0"
LIBRARY = "fmct"
SYNTHETIC_DATASET = "fmct-synth"  # the datasets entry of anything trained or measured on `fmct synth` cohorts


def model_index_entry(name: str, task: str, dataset: str, metrics: list[dict]) -> dict:
    """One ``model-index`` entry: ``task`` (e.g. "ich detection") measured on ``dataset`` with ``metrics``
    ({"type": "roc_auc", "name": "AUROC, test (ID)", "value": 0.83}, ...)."""
    return {
        "name": name,
        "results": [
            {
                "task": {"type": "image-classification", "name": task},
                "dataset": {"name": dataset, "type": dataset},
                "metrics": metrics,
            }
        ],
    }


def render_card(
    title: str,
    lead: str,
    sections: list[tuple[str, str]],
    *,
    tags: list[str],
    datasets: list[str] | None = None,
    base_model: str | None = None,
    model_index: list[dict] | None = None,
) -> str:
    """The card's Markdown: front matter, ``# title``, ``lead``, then each (heading, body) of ``sections``."""
    metadata: dict = {"license": LICENSE, "library_name": LIBRARY, "tags": [LIBRARY, *tags]}
    if datasets:
        metadata["datasets"] = datasets
    if base_model:
        metadata["base_model"] = base_model
    if model_index:
        metadata["model-index"] = model_index
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()
    body = "\n\n".join(f"## {heading}\n{text.strip()}" for heading, text in sections)
    return f"---\n{front}\n---\n# {title}\n\n{lead.strip()}\n\n{body}\n"


def front_matter(card: str) -> dict:
    """The metadata of a card written by :func:`render_card` ({} when it has none)."""
    if not card.startswith("---\n"):
        return {}
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end]) or {}
