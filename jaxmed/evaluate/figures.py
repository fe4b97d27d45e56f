"""Evaluation figures as PNG files: confusion matrices, ROC and PR curves, training curves, prediction grids, heatmaps.

Figures are built on matplotlib's object API with the Agg canvas, not pyplot: nothing touches the global
backend or pyplot's list of open figures, so these run in a headless job or next to a notebook's own plots.
"""

from __future__ import annotations

import json
import math

import numpy as np
from etils import epath
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxmed.errors import JaxmedError

_DPI = 120
_MISTAKE_COLOUR = "#d62728"
_CORRECT_COLOUR = "#2ca02c"


def confusion_matrix(matrix, class_names: list[str], path) -> None:
    """Counts and row-normalised (recall per true class) side by side, class names on both axes."""
    matrix = np.asarray(matrix)
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    num_classes = len(class_names)
    side = max(4.0, 0.55 * num_classes + 2.5)
    fig = _figure(2 * side + 1, side)
    axes = fig.subplots(1, 2)
    for ax, values, title, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set(xticks=range(num_classes), yticks=range(num_classes), xlabel="predicted", ylabel="true", title=title)
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
        threshold = values.max() / 2 if values.size else 0
        for i in range(num_classes):
            for j in range(num_classes):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=_cell_fontsize(num_classes),
                        color="white" if values[i, j] > threshold else "black")
    _save(fig, path)


def roc_curves(labels, probabilities, class_names: list[str], path) -> None:
    """One-vs-rest ROC per class (only the positive class 1 for two classes), AUC in the legend."""
    from sklearn import metrics

    fig = _figure(6.5, 6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, is_class, score, colour in _one_vs_rest(labels, probabilities, class_names):
        if _has_both_outcomes(is_class):
            false_positive_rate, true_positive_rate, _ = metrics.roc_curve(is_class, score)
            auc = metrics.roc_auc_score(is_class, score)
            ax.plot(false_positive_rate, true_positive_rate, color=colour, label=f"{name} (AUC {auc:.3f})")
        else:
            ax.plot([], [], color=colour, label=f"{name} (AUC n/a: {_outcome_missing(is_class)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title="ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=_legend_fontsize(len(class_names)))
    _save(fig, path)


def pr_curves(labels, probabilities, class_names: list[str], path) -> None:
    """One-vs-rest precision-recall per class, average precision in the legend, prevalence as the chance level."""
    from sklearn import metrics

    fig = _figure(6.5, 6)
    ax = fig.subplots()
    for name, is_class, score, colour in _one_vs_rest(labels, probabilities, class_names):
        if not is_class.any():
            ax.plot([], [], color=colour, label=f"{name} (AP n/a: no examples)")
            continue
        precision, recall, _ = metrics.precision_recall_curve(is_class, score)
        average_precision = metrics.average_precision_score(is_class, score)
        prevalence = is_class.mean()
        ax.plot(recall, precision, color=colour, drawstyle="steps-post",
                label=f"{name} (AP {average_precision:.3f}, prevalence {prevalence:.2f})")
        ax.axhline(prevalence, color=colour, linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision",
           title="precision-recall, one vs rest (dotted: prevalence)")
    ax.legend(loc="lower left", fontsize=_legend_fontsize(len(class_names)))
    _save(fig, path)


def training_curves(metrics_jsonl_path, path) -> None:
    """Loss, accuracy-like metrics, per-class validation recall and learning rate from W/metrics.jsonl.

    A panel whose keys never appear is left out (e.g. no validation yet). A step logged twice (a resumed run
    repeats the steps after its last checkpoint) keeps its last value.
    """
    series = _read_metrics_jsonl(epath.Path(metrics_jsonl_path))
    recall_keys = sorted(key for key in series if key.startswith("val/recall/"))
    panels = [
        ("loss", ["train/loss", "val/loss"], False),
        ("accuracy", ["train/accuracy", "val/accuracy", "val/balanced_accuracy", "val/f1_macro"], False),
        ("validation recall per class", recall_keys, False),
        ("learning rate", ["train/lr"], True),
    ]
    panels = [(title, [key for key in keys if key in series], is_lr) for title, keys, is_lr in panels]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        raise JaxmedError(f"{metrics_jsonl_path} has none of train/loss, val/loss, train/accuracy, val/accuracy, "
                          f"train/lr; it has {sorted(series)}")
    # two panels a row: report.html shows figures at most 1150 px wide, where four in a row were too small to read
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig = _figure(6 * columns, 4.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys, is_lr) in zip(axes, panels):
        for key in keys:
            steps, values = series[key]
            # Validation is logged rarely; markers keep a few points visible as points.
            marker = "o" if key.startswith("val/") else None
            ax.plot(steps, values, marker=marker, markersize=3, label=key.removeprefix("val/recall/"))
        ax.set(title=title, xlabel="step")
        if is_lr:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:
            ax.legend(fontsize=_legend_fontsize(len(keys)))
        ax.grid(alpha=0.3)
    _save(fig, path)


def predictions_grid(images, labels, predictions, probabilities, class_names: list[str], path,
                     max_images: int = 16) -> None:
    """The first `max_images` images titled "true / predicted (p)"; mistakes get a red title and frame."""
    count = min(len(images), max_images)
    if not count:
        raise ValueError("predictions_grid needs at least one image")
    rows, columns = _grid_shape(count)
    fig = _figure(2.4 * columns, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        if i >= count:
            ax.set_axis_off()
            continue
        true, predicted = int(labels[i]), int(predictions[i])
        colour = _CORRECT_COLOUR if true == predicted else _MISTAKE_COLOUR
        _show_image(ax, images[i])
        ax.set_title(f"{class_names[true]} / {class_names[predicted]} ({probabilities[i][predicted]:.2f})",
                     color=colour, fontsize=8)
        if true != predicted:
            _frame(ax, colour)
    _save(fig, path)


def overlay(images, heatmaps, titles, path, *, alpha: float = 0.45) -> None:
    """Each image with its heatmap (values in 0..1, any resolution; resized bilinearly) blended on top.

    For attention rollout and Grad-CAM, which come out at patch or feature-map resolution.
    """
    if len(images) != len(heatmaps) or (titles is not None and len(titles) != len(images)):
        raise ValueError(f"overlay needs one heatmap and one title per image; got {len(images)} images, "
                         f"{len(heatmaps)} heatmaps, {None if titles is None else len(titles)} titles")
    if not len(images):
        raise ValueError("overlay needs at least one image")
    rows, columns = _grid_shape(len(images))
    fig = _figure(2.6 * columns, 2.7 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.set_axis_off()
            continue
        image = np.asarray(images[i])
        _show_image(ax, image)
        heatmap = resize_heatmap(heatmaps[i], image.shape[:2])
        ax.imshow(heatmap, cmap="jet", vmin=0, vmax=1, alpha=alpha, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    _save(fig, path)


def resize_heatmap(heatmap, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D heatmap resized bilinearly to (height, width) and clipped to 0..1."""
    import cv2

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D (height, width); got shape {heatmap.shape}")
    height, width = shape
    return np.clip(cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> None:
    """Write the PNG and release the figure's memory (there is no pyplot reference to close)."""
    path = epath.Path(path)  # a local path or gs://…
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        with path.open("wb") as file:
            fig.savefig(file, dpi=_DPI, format="png")
    finally:
        fig.clear()


def _one_vs_rest(labels, probabilities, class_names):
    """(name, is_class, score, colour) per class; two classes plot only class 1, whose curve says it all."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(f"expected probabilities of shape ({len(labels)}, {len(class_names)}) for {len(labels)} "
                         f"labels and classes {list(class_names)}; got {probabilities.shape}")
    indices = [1] if len(class_names) == 2 else range(len(class_names))
    palette = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    for index in indices:
        yield class_names[index], labels == index, probabilities[:, index], palette(index % palette.N)


def _has_both_outcomes(is_class) -> bool:
    return bool(is_class.any() and not is_class.all())


def _outcome_missing(is_class) -> str:
    return "no examples" if not is_class.any() else "no other classes"


def _read_metrics_jsonl(path) -> dict[str, tuple[list[int], list[float]]]:
    """key → (steps, values), sorted by step; the last record of a repeated step wins."""
    if not path.is_file():
        raise JaxmedError(f"no metrics file at {path}; training writes W/metrics.jsonl — pass the run's workdir")
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise JaxmedError(f"{path}:{number} is not JSON ({error.msg}): {line[:80]!r}") from None
        step = record.pop("step", None)
        if step is None:
            continue
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[int(step)] = float(value)
    if not by_key:
        raise JaxmedError(f"{path} has no metrics (empty, or no records with a step); has the run logged yet?")
    return {key: (sorted(values), [values[step] for step in sorted(values)]) for key, values in by_key.items()}


def _show_image(ax, image) -> None:
    """uint8 H×W, H×W×1 or H×W×3 without axes ticks; grey images in grey, not a false-colour map."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    elif image.ndim == 3 and image.shape[-1] == 3:
        ax.imshow(image)
    else:
        raise ValueError(f"an image must be H×W, H×W×1 or H×W×3; got shape {image.shape}")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _frame(ax, colour: str) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(3)


def _grid_shape(count: int) -> tuple[int, int]:
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns


def _cell_fontsize(num_classes: int) -> float:
    return 10 if num_classes <= 6 else 8 if num_classes <= 10 else 6.5


def _legend_fontsize(entries: int) -> float:
    return 9 if entries <= 6 else 7
