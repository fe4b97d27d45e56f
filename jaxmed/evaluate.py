"""Checkpoint → predictions → metrics → W/eval/<split>/report.json, report.md and figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger("jaxmed.evaluate")


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """The reference notebooks' numbers, from scikit-learn."""
    from sklearn import metrics

    predictions = probabilities.argmax(-1)
    ids = list(range(len(class_names)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                             zero_division=0)
    report = {
        "num_examples": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(labels, predictions)),
        "cohen_kappa": float(metrics.cohen_kappa_score(labels, predictions, labels=ids)),
        "class_names": list(class_names),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": metrics.confusion_matrix(labels, predictions, labels=ids).tolist(),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = metrics.precision_recall_fscore_support(labels, predictions, labels=ids, average=average,
                                                             zero_division=0)
        report[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    return report


def plot_confusion_matrix(matrix, class_names: list[str], path: Path) -> None:
    """Counts and row-normalised (recall per true class), class names on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.8 * len(class_names) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, values, title, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true",
               title=title)
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
        threshold = values.max() / 2 if values.size else 0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center",
                        color="white" if values[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {report.get('split', 'evaluation')} — {report['num_examples']} images", "",
             f"- accuracy: {report['accuracy']:.4f}", f"- balanced accuracy: {report['balanced_accuracy']:.4f}",
             f"- Cohen's κ: {report['cohen_kappa']:.4f}", "", "| class | precision | recall | F1 | support |",
             "|---|---|---|---|---|"]
    for name, row in report["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    plot_confusion_matrix(report["confusion_matrix"], report["class_names"], out_dir / "confusion_matrix.png")


def evaluate_run(run, checkpoints, eval_step, split_name: str) -> dict:
    """Best checkpoint (by validation) on a split of the run's dataset → report; latest weights if no best."""
    from jaxmed import train

    step = checkpoints.best_step()
    if step is not None:
        abstract = train.abstract_state(run, 0)
        weights = checkpoints.restore_weights(step, {"params": abstract["params"], "stats": abstract["stats"]})
        source = f"best/{step}"
    else:
        step = checkpoints.latest_step()
        phase = train.phase_index(run, max(step - 1, 0))
        weights = checkpoints.restore_state(step, train.abstract_state(run, phase))
        source = f"checkpoints/{step}"
    split = run.dataset.splits[split_name]
    indices, logits = train.predict(run, eval_step, weights["params"], weights["stats"], split)
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    report = classification_metrics(split.labels[indices], probabilities, run.dataset.class_names)
    report.update(split=split_name, checkpoint=source)
    if jax.process_index() == 0:
        write_report(run.workdir / "eval" / split_name, report)
        log.info("%s: accuracy %.4f (%s) → %s", split_name, report["accuracy"], source,
                 run.workdir / "eval" / split_name)
    return report
