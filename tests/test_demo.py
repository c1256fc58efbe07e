"""`fmct demo` end to end on a reduced cohort: every verb runs, the report has every section."""

import pytest

from fmct.cli import main


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [
        "n_scans=36", "matrix=128", "seeds=1", "label_fractions=0.5,1", "finetune_steps=6", "finetune_batch_size=4",
        "findings=ich,hydrocephalus",
        "pretrain=[optim.epochs=2, optim.batch_size=4, optim.warmup_epochs=1, engine.checkpoint_every=5]",
    ]
    assert main(["demo", "--out", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "ich: AUROC [95% CI] by share of training labels" in printed and "report:" in printed
    html = (out / "report.html").read_text()
    for section in ("summary", "roc", "label-efficiency", "id-vs-ood", "comparisons", "metrics", "provenance"):
        assert f"<h2 id='{section}'>" in html
    for arm in ("vit (pretrained)", "vit (scratch)", "vit-linear-probe (pretrained)"):
        assert arm in printed
    # Re-running resumes: every stage finds its work done.
    assert main(["demo", "--out", str(out), *overrides]) == 0
