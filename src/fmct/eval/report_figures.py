"""The figures of ``fmct report``, as PNG bytes: ROC curves, label efficiency, reliability diagrams and
pretraining learning curves (matplotlib, Agg backend, no display needed).

Every figure draws the rows of an :class:`fmct.eval.evaluate.Evaluation` as they are; not estimable rows
(fewer than 5 positives or negatives) carry no metric and are not drawn.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib import ticker  # noqa: E402

from fmct.eval.evaluate import CEILING, PROBABILITY_COLUMN, Evaluation  # noqa: E402

DPI = 110
PANEL = (5.0, 4.4)  # inches per ID/OOD panel
COLOURS = plt.get_cmap("tab10").colors
MIN_BIN_SCANS = 5  # a reliability bin with fewer scans (per seed) is drawn hollow and not joined
CEILING_LABEL = "ceiling (scratch, all labels)"  # the supervised ceiling's dashed line in the label-efficiency figure


def png(figure) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def system_name(row: dict) -> str:
    """How a system is named everywhere in the report: ``model (arm)``."""
    return f"{row['model']} ({row['arm']})" if row.get("arm") else row["model"]


def number(value, digits: int = 3) -> str:
    """A metric as the report prints it; ``n/a`` for a missing or NaN value."""
    value = as_float(value)
    return "n/a" if value != value else f"{value:.{digits}f}"


def as_float(value) -> float:
    """A value of a row as a float (rows read back from JSON hold None for NaN, CSV rows strings)."""
    return float("nan") if value is None or value == "" else float(value)


def largest_budget(rows: list[dict]) -> tuple[str, str]:
    """The (label_fraction, shots) of the largest label fraction among ``rows``, else of the most shots."""
    budgets = {(r["label_fraction"], r["shots"]) for r in rows}
    fractions = [b for b in budgets if not b[1]]
    if fractions:
        return max(fractions, key=lambda b: float(b[0]))
    return max(budgets, key=lambda b: float(b[1]))


def _estimable(evaluation: Evaluation, finding: str) -> list[dict]:
    return [r for r in evaluation.metrics if r["finding"] == finding and math.isfinite(as_float(r["auroc"]))]


def _groups(rows: list[dict]) -> list[str]:
    return [g for g in ("ID", "OOD") if any(r["group"] == g for r in rows)]


def _colours(rows: list[dict]) -> dict[str, tuple]:
    """One colour per system, in the order of the rows (the evaluation's: pretrained first, floors last)."""
    return {system: COLOURS[i % len(COLOURS)] for i, system in enumerate(dict.fromkeys(system_name(r) for r in rows))}


def budget_text(fraction: str, shots: str) -> str:
    """A label budget in words: ``label fraction 0.1`` or ``16 shots``."""
    return f"{shots} shots" if shots else f"label fraction {fraction}"


def figures(evaluation: Evaluation) -> dict[str, bytes]:
    """Per finding with an estimable row: ``roc_<finding>``, ``label_efficiency_<finding>`` (when the systems
    drawn as curves, all but the ceiling, have more than one budget) and ``calibration_<finding>``."""
    drawn = {}
    for finding in sorted({r["finding"] for r in evaluation.metrics}):
        rows = _estimable(evaluation, finding)
        if not rows:
            continue
        drawn[f"roc_{finding}"] = png(roc_figure(evaluation, finding, rows))
        if len({(r["label_fraction"], r["shots"]) for r in rows if r["arm"] != CEILING}) > 1:
            drawn[f"label_efficiency_{finding}"] = png(label_efficiency_figure(finding, rows))
        if evaluation.calibration:
            drawn[f"calibration_{finding}"] = png(calibration_figure(evaluation, finding, rows))
    return drawn


def roc_figure(evaluation: Evaluation, finding: str, rows: list[dict]):
    """ROC curves (averaged over seeds) at the largest label budget, one panel per site group."""
    fraction, shots = largest_budget(rows)
    groups, colours = _groups(rows), _colours(rows)
    figure, axes = plt.subplots(1, len(groups), figsize=(PANEL[0] * len(groups), PANEL[1]), squeeze=False)
    for ax, group in zip(axes[0], groups):
        curves: dict[str, list[tuple[float, float]]] = {}
        for point in evaluation.roc:
            if (point["finding"], point["group"], point["label_fraction"], point["shots"]) == (
                finding,
                group,
                fraction,
                shots,
            ):
                curves.setdefault(system_name(point), []).append((point["fpr"], point["tpr"]))
        cells = {
            system_name(r): r
            for r in rows
            if r["group"] == group and (r["label_fraction"], r["shots"]) == (fraction, shots)
        }
        for system, points in sorted(curves.items(), key=lambda kv: list(colours).index(kv[0])):
            fpr, tpr = zip(*sorted(points))
            ax.step(fpr, tpr, where="post", color=colours[system], label=f"{system}: {number(cells[system]['auroc'])}")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        some = next(iter(cells.values()), None)
        counts = f"\n{some['n_pos']} positive / {some['n_neg']} negative scans" if some else ""
        ax.set(
            title=f"{finding}, {group} ({budget_text(fraction, shots)}){counts}",
            xlabel="1 - specificity",
            ylabel="sensitivity",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        # Below the panel: near chance the curves run through the lower right, where a legend inside would sit.
        ax.legend(
            fontsize=7.5,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            frameon=False,
            title="AUROC (mean over seeds)",
            title_fontsize=7.5,
        )
    return figure


def label_efficiency_figure(finding: str, rows: list[dict]):
    """AUROC against the number of labelled training scans (log scale): a row of panels per site group, a
    panel per system with its line and 95% CI band, the other systems' lines in grey behind it (one band per
    panel, so no band hides another).

    Label fractions are solid lines, N-shot budgets (balanced: N positives and N negatives) dashed. Where
    run.json does not record the training-set sizes, the x axis is the label fraction instead. The
    supervised ceiling (arm ``CEILING``: one budget, all the labels) is no panel of its own but a dashed
    horizontal line at its AUROC across every panel of its site group, labelled :data:`CEILING_LABEL`.
    """
    ceilings = [r for r in rows if r["arm"] == CEILING]
    if ceilings:
        ceilings = [r for r in ceilings if (r["label_fraction"], r["shots"]) == largest_budget(ceilings)]
    rows = [r for r in rows if r["arm"] != CEILING]
    by_count = all(math.isfinite(as_float(r.get("n_train"))) for r in rows)
    groups, colours = _groups(rows), _colours(rows)
    systems = list(colours)
    columns = min(len(systems), 5)
    lines_per_group = math.ceil(len(systems) / columns)
    figure, axes = plt.subplots(
        len(groups) * lines_per_group,
        columns,
        squeeze=False,
        sharex=True,
        sharey=True,
        figsize=(2.5 * columns + 0.4, 2.4 * len(groups) * lines_per_group + 0.4),
    )
    lowest = min([as_float(r["auroc_lo"]) for r in rows if math.isfinite(as_float(r["auroc_lo"]))] or [0.5])
    several_ceilings = len({r["model"] for r in ceilings}) > 1
    budgets = sorted(
        {as_float(r["n_train"]) if by_count else float(r["label_fraction"]) for r in rows if by_count or not r["shots"]}
    )

    def curves(group: str, system: str) -> list[tuple[str, list[tuple[float, dict]]]]:
        found = []
        for kind, style in (("fraction", "-"), ("shots", "--")):
            mine = [
                r
                for r in rows
                if r["group"] == group and system_name(r) == system and bool(r["shots"]) == (kind == "shots")
            ]
            if by_count:
                points = sorted(((as_float(r["n_train"]), r) for r in mine), key=lambda p: p[0])
            elif kind == "fraction":
                points = sorted(((float(r["label_fraction"]), r) for r in mine), key=lambda p: p[0])
            else:
                points = []  # shots have no label fraction to stand on
            if points:
                found.append((style, points))
        return found

    for g, group in enumerate(groups):
        for s_index, system in enumerate(systems):
            ax = axes[g * lines_per_group + s_index // columns][s_index % columns]
            for other in systems:
                if other != system:
                    for style, points in curves(group, other):
                        ax.plot(
                            [p[0] for p in points],
                            [as_float(p[1]["auroc"]) for p in points],
                            style,
                            color="0.78",
                            linewidth=1,
                            zorder=1,
                        )
            for style, points in curves(group, system):
                x = [p[0] for p in points]
                ax.fill_between(
                    x,
                    [as_float(p[1]["auroc_lo"]) for p in points],
                    [as_float(p[1]["auroc_hi"]) for p in points],
                    color=colours[system],
                    alpha=0.2,
                    linewidth=0,
                    zorder=2,
                )
                ax.plot(
                    x,
                    [as_float(p[1]["auroc"]) for p in points],
                    style,
                    marker="o",
                    markersize=3.5,
                    color=colours[system],
                    linewidth=1.8,
                    zorder=3,
                )
            ax.set_xscale("log")
            # Ticks at the budgets themselves, as plain numbers: 5, 14, 48 labelled scans, not 6 x 10^0.
            ax.xaxis.set_major_locator(ticker.FixedLocator(budgets))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_ylim(min(0.45, lowest - 0.02), 1.0)
            ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
            for ceiling in (r for r in ceilings if r["group"] == group):
                label = f"{ceiling['model']} {CEILING_LABEL}" if several_ceilings else CEILING_LABEL
                level = as_float(ceiling["auroc"])
                ax.axhline(level, color="0.2", linestyle="--", linewidth=1.1, zorder=4, label=label)
                ax.text(
                    0.02,
                    level,
                    f"{label}: {level:.3f}",
                    transform=ax.get_yaxis_transform(),
                    fontsize=6.5,
                    color="0.2",
                    va="bottom",
                    zorder=4,
                )
            ax.grid(alpha=0.3, which="major")
            ax.xaxis.set_tick_params(labelbottom=True)  # every panel keeps its scale, also above an empty place
            ax.set_title(f"{system}\n{finding}, {group}", fontsize=8.5)
            ax.tick_params(labelsize=7.5)
            if s_index % columns == 0:
                ax.set_ylabel("AUROC (band: 95% CI)", fontsize=8)
        for s_index in range(len(systems), lines_per_group * columns):  # empty places of the last line
            axes[g * lines_per_group + s_index // columns][s_index % columns].set_visible(False)
    xlabel = "labelled training scans (log scale)" if by_count else "share of the training labels (log scale)"
    figure.supxlabel(xlabel, fontsize=9)
    figure.tight_layout()
    return figure


def calibration_figure(evaluation: Evaluation, finding: str, rows: list[dict]):
    """Reliability diagrams at the largest label budget: observed rate of positives against the mean
    predicted probability per bin (marker area: scans in the bin), one panel per site group."""
    fraction, shots = largest_budget(rows)
    groups, colours = _groups(rows), _colours(rows)
    figure, axes = plt.subplots(1, len(groups), figsize=(PANEL[0] * len(groups), PANEL[1]), squeeze=False)
    for ax, group in zip(axes[0], groups):
        cells = {
            system_name(r): r
            for r in rows
            if r["group"] == group and (r["label_fraction"], r["shots"]) == (fraction, shots)
        }
        for system in [s for s in colours if s in cells]:
            bins = [
                b
                for b in evaluation.calibration
                if system_name(b) == system
                and (b["finding"], b["group"], b["label_fraction"], b["shots"]) == (finding, group, fraction, shots)
            ]
            if not bins:
                continue
            row = cells[system]
            calibrated = row.get("probability_source") == PROBABILITY_COLUMN
            label = f"{system}: ECE {number(row.get('ece'))}" + ("" if calibrated else " (uncalibrated)")
            # Bins of fewer than MIN_BIN_SCANS scans are drawn hollow and left off the line: one scan more or
            # less moves them from 0 to 1, and a line through them would draw that noise as a shape.
            solid = [b for b in bins if b["n_scans"] >= MIN_BIN_SCANS]
            ax.plot(
                [b["mean_probability"] for b in solid],
                [b["observed_rate"] for b in solid],
                "-" if calibrated else "--",
                color=colours[system],
                linewidth=1,
                label=label,
            )
            for members, face in ((solid, colours[system]), ([b for b in bins if b not in solid], "none")):
                # Marker area grows with the bin's share of the scans: a bin of 2 scans is not read like one of 200.
                ax.scatter(
                    [b["mean_probability"] for b in members],
                    [b["observed_rate"] for b in members],
                    s=[10 + 250 * b["n_scans"] / max(1.0, row["n_scans"]) for b in members],
                    facecolors=face,
                    edgecolors=colours[system],
                    alpha=0.75,
                    linewidths=0.8,
                )
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
        ax.set(
            title=f"{finding}, {group} ({budget_text(fraction, shots)})",
            xlabel="predicted probability (bin mean)",
            ylabel="observed share of positives",
            xlim=(0, 1),
            ylim=(-0.02, 1.02),
        )
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        # Below the panel: inside, the legend would hide the bins near the diagonal's ends.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return figure


# ---------------------------------------------------------------------------------- pretraining
def learning_curve_figure(records: list[dict], title: str):
    """Three panels by step: the loss terms; the teacher's head-output cosine between scans (near 1 for a
    collapsed DINO head) and its entropy; the online validation k-NN and linear AUROC per finding (left
    axis) and RankMe (right axis)."""
    figure, (losses, teacher, online) = plt.subplots(1, 3, figsize=(17, 4.2))
    figure.subplots_adjust(wspace=0.45)  # room for the twin axes' labels between the panels

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return [p[0] for p in points], [p[1] for p in points]

    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "mae_loss"):
        steps, values = series(key)
        if steps:
            losses.plot(steps, values, label=key)
    losses.set(title=f"{title}: losses", xlabel="step")
    steps, values = series("teacher_cosine")
    if steps:
        teacher.plot(steps, values, label="head-output cosine between scans")
    teacher.set(title="DINO teacher", xlabel="step", ylabel="cosine (near 1: collapsed)", ylim=(0, 1.05))
    steps, values = series("teacher_entropy")
    if steps:
        entropy_axis = teacher.twinx()
        entropy_axis.plot(steps, values, color="tab:orange", label="teacher entropy (nats, at most ln K)")
        entropy_axis.set_ylabel("entropy (nats)")
        entropy_axis.legend(fontsize=7, loc="upper right")
    for key in sorted({k for r in records for k in r if k.startswith("online_") and "auroc" in k}):
        steps, values = series(key)
        online.plot(steps, values, marker="o", markersize=3, label=key.removeprefix("online_").replace("_auroc", ""))
    online.axhline(0.5, color="0.7", linestyle=":", linewidth=1)
    online.set(title="online validation AUROC (step 0: random init)", xlabel="step", ylabel="AUROC")
    steps, values = series("online_rankme")
    if steps:
        rank_axis = online.twinx()
        rank_axis.plot(steps, values, color="black", linestyle="--", label="RankMe")
        rank_axis.set_ylabel("RankMe (effective rank)")
        rank_axis.legend(fontsize=7, loc="upper right")
    for ax in (losses, teacher, online):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    return figure
