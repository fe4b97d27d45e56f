"""The figures of `python -m jaxmed.compare`: every run's ROC curve on one plot, and a forest plot of the paired
differences. Same house style as figures.py (matplotlib's object API on the Agg canvas, no pyplot)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from jaxmed.evaluate import paired
from jaxmed.evaluate.figures import _figure, _legend_fontsize, _save

# Where the macro-average ROC is evaluated, besides every class's own false positive rates.
_FPR_GRID = np.linspace(0.0, 1.0, 201)


def roc_curve_of(labels, probabilities) -> tuple[np.ndarray, np.ndarray] | None:
    """(false positive rates, true positive rates) of one run, or None when no class has both outcomes.

    Two classes: the ROC of class 1 (the positive class). More: the macro average, each class's one-vs-rest TPR
    interpolated on a common FPR grid (the union of the classes' own FPRs and a fine grid) and averaged.
    """
    from sklearn import metrics

    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, np.float64)
    classes = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    curves = []
    for k in classes:
        is_class = labels == k
        if is_class.any() and not is_class.all():
            fpr, tpr, _ = metrics.roc_curve(is_class, probabilities[:, k])
            curves.append((fpr, tpr))
    if not curves:
        return None
    if len(curves) == 1 and probabilities.shape[1] == 2:
        return curves[0]
    grid = np.unique(np.concatenate([_FPR_GRID, *(fpr for fpr, _ in curves)]))
    mean_tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], 0)
    # The curve starts at (0, 0); a vertical first step is then drawn as such, not as a slope.
    return np.r_[0.0, grid], np.r_[0.0, mean_tpr]


def roc_overlay(names: list[str], labels, probabilities_per_run, class_names: list[str], aucs, path) -> None:
    """All runs' ROC curves on one plot, each run's AUC (as in comparison.json) in the legend."""
    binary = len(class_names) == 2
    fig = _figure(6.5, 6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    auc_name = "AUC" if binary else "macro AUC"
    for index, (name, probabilities, auc) in enumerate(zip(names, probabilities_per_run, aucs)):
        colour = palette(index % palette.N)
        curve = roc_curve_of(labels, probabilities)
        if curve is None or auc is None:
            ax.plot([], [], color=colour, label=f"{name} ({auc_name} n/a: no class has both outcomes)")
        else:
            ax.plot(*curve, color=colour, label=f"{name} ({auc_name} {auc:.3f})")
    title = f"ROC of {class_names[1]} (the positive class)" if binary else "ROC, macro average over the classes"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=title)
    fontsize = _legend_fontsize(len(names) + 1)
    ax.legend(loc="lower right", fontsize=fontsize, title_fontsize=fontsize,
              title=None if binary else "one-vs-rest TPR averaged on a common FPR grid;\nmacro AUC: the mean of the "
                                        "classes' AUCs")
    _save(fig, path)


def differences(pairs: list[dict], paired_metrics, path) -> None:
    """Forest plot: per pair and metric, the difference A − B in percentage points with its paired-bootstrap 95%
    interval, a line at zero (no difference), and the numbers written at the right."""
    rows = []  # (label, metric index, difference pp, interval pp)
    for pair in pairs:
        for index, (key, _) in enumerate(paired_metrics):
            entry = pair["paired_bootstrap"][key]
            difference = None if entry["difference"] is None else 100 * entry["difference"]
            interval = None if entry["ci95"] is None else [100 * v for v in entry["ci95"]]
            rows.append((f"{pair['a']} − {pair['b']}", index, difference, interval))
    fig = _figure(8.5, 1.5 + 0.3 * len(rows))
    ax = fig.subplots()
    palette = colormaps["tab10"]
    positions = np.arange(len(rows))[::-1]  # first pair at the top
    for y, (label, index, difference, interval) in zip(positions, rows):
        colour = palette(index % palette.N)
        if difference is None:
            continue
        error = None if interval is None else [[difference - interval[0]], [interval[1] - difference]]
        ax.errorbar(difference, y, xerr=error, fmt="o", color=colour, capsize=3, markersize=5)
    ax.axvline(0, color="grey", linewidth=1, linestyle="--")
    # One pair label per group, on its middle row; the colours say which metric each row is.
    per_pair = len(paired_metrics)
    ax.set_yticks(positions, [label if index == per_pair // 2 else "" for label, index, *_ in rows], fontsize=8)
    ax.tick_params(axis="y", length=0)
    # Pairs are told apart by faint bands: every metric of one pair shares one.
    for start in range(0, len(rows), 2 * per_pair):
        ax.axhspan(positions[start] + 0.5, positions[min(start + per_pair, len(rows)) - 1] - 0.5, color="0.94",
                   zorder=0)
    for y, (_, _, difference, interval) in zip(positions, rows):
        text = "n/a" if difference is None else paired._signed(difference) + (
            f" [{paired._signed(interval[0])}, {paired._signed(interval[1])}]" if interval else "")
        ax.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=7)
    for index, (_, label) in enumerate(paired_metrics):
        ax.plot([], [], "o", color=palette(index % palette.N), label=label)
    ax.set(ylim=(-0.7, len(rows) - 0.3), xlabel="difference A − B (percentage points), paired-bootstrap 95% interval",
           title="paired differences (left of the dashed line: B is higher)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
