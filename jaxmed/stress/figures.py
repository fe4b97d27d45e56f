"""The stress test's PNGs: the balanced-accuracy drop as a corruption × severity heat-map, a curve per corruption,
and one image under every corruption at every severity."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxmed.stress import corruptions as jcorrupt  # noqa: E402


def _table(records):
    clean = records[0]["balanced_accuracy"]
    names = list(dict.fromkeys(r["corruption"] for r in records[1:]))
    severities = sorted({r["severity"] for r in records[1:]})
    drop = np.full((len(names), len(severities)), np.nan)
    for r in records[1:]:
        drop[names.index(r["corruption"]), severities.index(r["severity"])] = clean - r["balanced_accuracy"]
    return names, severities, drop, clean


def drop_heatmap(records, path) -> None:
    names, severities, drop, clean = _table(records)
    figure, axis = plt.subplots(figsize=(1.2 * len(severities) + 3, 0.45 * len(names) + 1.5), dpi=110)
    image = axis.imshow(drop, cmap="Reds", vmin=0, vmax=max(0.05, np.nanmax(drop) if drop.size else 0.05),
                        aspect="auto")
    for (row, column), value in np.ndenumerate(drop):
        if np.isfinite(value):
            axis.text(column, row, f"{value:+.3f}", ha="center", va="center", fontsize=8)
    axis.set_xticks(range(len(severities)), [str(s) for s in severities])
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("severity")
    axis.set_title(f"balanced accuracy drop from clean ({clean:.3f})")
    figure.colorbar(image, ax=axis, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def curves(records, path) -> None:
    names, severities, drop, clean = _table(records)
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    for row, name in enumerate(names):
        axis.plot([0, *severities], [clean, *(clean - drop[row])], marker="o", label=name)
    axis.set_xlabel("severity (0 = clean)")
    axis.set_ylabel("balanced accuracy")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def examples(clean, chosen, seed, path) -> None:
    """The first image of the split under each corruption (rows) at severities 0–5 (columns)."""
    image = np.asarray(clean[:1])
    columns = (0, *jcorrupt.SEVERITIES)
    figure, axes = plt.subplots(len(chosen), len(columns), figsize=(1.3 * len(columns), 1.3 * len(chosen) + 0.3),
                                dpi=100, squeeze=False)
    for row, corruption in enumerate(chosen):
        for column, severity in enumerate(columns):
            axis = axes[row, column]
            try:
                shown = jcorrupt.corrupt(image, corruption, severity, seed)[0]
                axis.imshow(shown[..., 0] if shown.ndim == 3 and np.all(shown == shown[..., :1]) else shown,
                            cmap="gray", vmin=0, vmax=255)
            except Exception:  # a corruption that failed in the run is an empty cell here
                pass
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"severity {severity}", fontsize=8)
            if column == 0:
                axis.set_ylabel(corruption.name, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
