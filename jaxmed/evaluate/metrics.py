"""Classification metrics for a report: scikit-learn's numbers, ROC AUC, bootstrap intervals and operating points."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

# A bootstrap chunk holds at most this many resampled labels, so a large test set does not allocate
# resamples × examples integers at once.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def classification_metrics(labels, probabilities, class_names: list[str], *, bootstrap: int = 1000,
                           seed: int = 0) -> dict:
    """Everything report.json needs for one split, as plain floats, ints, lists and None (JSON-serialisable).

    Predictions are the arg-max of `probabilities`. Values that are undefined on this split (AUC of a class
    with no examples, the interval of a recall whose class is absent) are None rather than a crash or a 0.
    """
    labels, probabilities = _check_inputs(labels, probabilities, class_names)
    predictions = probabilities.argmax(-1)
    ids = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                         zero_division=0)
    report = {
        "num_examples": int(len(labels)),
        "class_names": list(class_names),
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
        "cohen_kappa": _nullable(skm.cohen_kappa_score(labels, predictions, labels=ids)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": skm.confusion_matrix(labels, predictions, labels=ids).tolist(),
        "roc_auc": roc_auc(labels, probabilities, class_names),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, predictions, labels=ids, average=average,
                                                         zero_division=0)
        report[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    if len(class_names) == 2:
        # Positive = class 1, the usual convention for (normal, disease) label orders.
        report["sensitivity"] = float(recall[1]) if support[1] else None
        report["specificity"] = float(recall[0]) if support[0] else None
    report["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed)}
    report["ci95"] = bootstrap_intervals(labels, predictions, class_names, bootstrap, seed) if bootstrap else None
    return report


def roc_auc(labels, probabilities, class_names: list[str]) -> dict:
    """One-vs-rest AUC per class and their macro mean; for two classes, `macro` is the positive-class AUC.

    A class that is absent from `labels` (or is every label) has no ROC curve: its AUC is None and the macro
    mean is over the classes that have one (None if none do).
    """
    labels, probabilities = _check_inputs(labels, probabilities, class_names)
    per_class = {}
    for i, name in enumerate(class_names):
        is_class = labels == i
        defined = 0 < is_class.sum() < len(labels)
        per_class[name] = float(skm.roc_auc_score(is_class, probabilities[:, i])) if defined else None
    if len(class_names) == 2:
        macro = per_class[class_names[1]]
    else:
        defined = [value for value in per_class.values() if value is not None]
        macro = float(np.mean(defined)) if defined else None
    return {"macro": macro, "per_class": per_class}


def bootstrap_intervals(labels, predictions, class_names: list[str], resamples: int = 1000,
                        seed: int = 0) -> dict:
    """Percentile 95% intervals of accuracy, macro-F1 and per-class recall over examples resampled with replacement.

    Each resample is reduced to its confusion matrix, from which the metrics follow with the same
    definitions as scikit-learn's (F1 of a class never predicted nor present is 0, as zero_division=0).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    confusions = _bootstrap_confusions(labels, predictions, len(class_names), resamples, seed)
    true_positives = np.diagonal(confusions, axis1=1, axis2=2).astype(np.float64)
    support = confusions.sum(2)
    predicted = confusions.sum(1)
    accuracy = true_positives.sum(1) / len(labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * true_positives / (support + predicted), 0.0)
        recall = np.where(support > 0, true_positives / support, np.nan)
    present = np.bincount(labels, minlength=len(class_names)) > 0
    return {
        "accuracy": _percentile_interval(accuracy),
        "f1_macro": _percentile_interval(f1.mean(1)),
        "recall": {name: _percentile_interval(recall[:, i]) if present[i] else None
                   for i, name in enumerate(class_names)},
    }


def operating_point(val_labels, val_probabilities, positive: int, target_recall: float) -> float:
    """The largest threshold t on P(positive) whose rule `P(positive) >= t` reaches `target_recall` on validation.

    Chosen on validation and then applied unchanged to test (apply_operating_point), so the test recall is an
    honest estimate of what the threshold delivers. The largest such t flags the fewest negatives.
    """
    val_probabilities = np.asarray(val_probabilities, dtype=np.float64)
    num_classes = val_probabilities.shape[-1] if val_probabilities.ndim == 2 else 0
    val_labels, val_probabilities = _check_inputs(val_labels, val_probabilities, [str(i) for i in range(num_classes)])
    _check_positive(val_probabilities, positive)
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall={target_recall} must be in (0, 1]")
    scores = np.sort(val_probabilities[val_labels == positive, positive])[::-1]
    if not len(scores):
        raise ValueError(f"class {positive} has no examples in the validation labels, so no threshold can reach "
                         f"recall {target_recall}; choose the operating point on a split that contains it")
    # Flagging the k highest-scoring positives gives recall k/P; the k-th highest score is the largest threshold
    # that flags k of them. Comparing k/P as recall is computed avoids ceil(target * P) rounding up by an ulp.
    flagged_needed = int(np.argmax(np.arange(1, len(scores) + 1) / len(scores) >= target_recall)) + 1
    return float(scores[flagged_needed - 1])


def apply_operating_point(labels, probabilities, positive: int, threshold: float, class_names: list[str]) -> dict:
    """Positive-vs-rest numbers of the rule `P(positive) >= threshold` (for more than two classes too)."""
    labels, probabilities = _check_inputs(labels, probabilities, class_names)
    _check_positive(probabilities, positive)
    is_positive = (labels == positive).astype(np.int64)
    flagged = (probabilities[:, positive] >= threshold).astype(np.int64)
    name = class_names[positive]
    return {
        "positive": name,
        "threshold": float(threshold),
        "num_examples": int(len(labels)),
        "num_positives": int(is_positive.sum()),
        "flagged": int(flagged.sum()),
        "sensitivity": _nullable(skm.recall_score(is_positive, flagged, pos_label=1, zero_division=np.nan)),
        "specificity": _nullable(skm.recall_score(is_positive, flagged, pos_label=0, zero_division=np.nan)),
        "precision": _nullable(skm.precision_score(is_positive, flagged, pos_label=1, zero_division=np.nan)),
        "confusion_matrix_labels": [f"not {name}", name],
        "confusion_matrix": skm.confusion_matrix(is_positive, flagged, labels=[0, 1]).tolist(),
    }


def _bootstrap_confusions(labels, predictions, num_classes: int, resamples: int, seed: int) -> np.ndarray:
    """Confusion matrices of `resamples` resamples, shape (resamples, true, predicted), in bounded-memory chunks."""
    rng = np.random.default_rng(seed)
    cells = labels * num_classes + predictions
    cells_per_matrix = num_classes * num_classes
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // len(labels))
    counts = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = cells[rng.integers(0, len(labels), size=(size, len(labels)))]
        # Offsetting each resample's cells by its own block lets one bincount count every resample at once.
        drawn += np.arange(size)[:, None] * cells_per_matrix
        counts.append(np.bincount(drawn.ravel(), minlength=size * cells_per_matrix).reshape(size, num_classes,
                                                                                              num_classes))
    return np.concatenate(counts)


def _percentile_interval(values) -> list[float] | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _check_inputs(labels, probabilities, class_names) -> tuple[np.ndarray, np.ndarray]:
    """Shape errors here name the mismatch; deep inside scikit-learn they would not."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.ndim != 1 or probabilities.ndim != 2 or len(labels) != len(probabilities):
        raise ValueError(f"expected labels of shape (N,) and probabilities of shape (N, classes); got "
                         f"{labels.shape} and {probabilities.shape}")
    if not len(labels):
        raise ValueError("no examples: labels and probabilities are empty")
    if probabilities.shape[1] != len(class_names):
        raise ValueError(f"probabilities have {probabilities.shape[1]} columns but there are {len(class_names)} "
                         f"class names {list(class_names)}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must be integers in [0, {len(class_names)}); got dtype {labels.dtype}, "
                         f"range [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64), probabilities


def _check_positive(probabilities, positive: int) -> None:
    if not 0 <= positive < probabilities.shape[1]:
        raise ValueError(f"positive={positive} is not a class index; probabilities have {probabilities.shape[1]} "
                         f"classes")


def _nullable(value) -> float | None:
    """NaN (an undefined metric) becomes None, which JSON can hold."""
    value = float(value)
    return None if math.isnan(value) else value
