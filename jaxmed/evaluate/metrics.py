"""Classification metrics for a report: scikit-learn's numbers, ROC AUC, 95% intervals and operating points."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

from jaxmed.evaluate import intervals, paired



def classification_metrics(labels, probabilities, class_names: list[str], *, bootstrap: int = 1000,
                           seed: int = 0, groups=None, proportion_method: str = "wilson") -> dict:
    """Everything report.json needs for one split, as plain floats, ints, lists and None (JSON-serialisable).

    Predictions are the arg-max of `probabilities`. A class absent from this split has no recall, precision, F1 or
    AUC (None, "n/a" in reports), is left out of the macro averages, and `notes` says so: a 0 there would be a
    claim about the model that no image supports. Intervals: see `interval_estimates`; `groups` (one patient id per
    image) makes the patient the unit.
    """
    labels, probabilities = _check_inputs(labels, probabilities, class_names)
    predictions = probabilities.argmax(-1)
    ids = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                         zero_division=0)
    predicted = np.bincount(predictions, minlength=len(class_names))
    present = [i for i in ids if support[i] > 0]
    report = {
        "num_examples": int(len(labels)),
        "class_names": list(class_names),
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
        "cohen_kappa": _nullable(skm.cohen_kappa_score(labels, predictions, labels=ids)),
        "per_class": {name: {"precision": float(precision[i]) if support[i] or predicted[i] else None,
                             "recall": float(recall[i]) if support[i] else None,
                             "f1": float(f1[i]) if support[i] else None,
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": skm.confusion_matrix(labels, predictions, labels=ids).tolist(),
        "roc_auc": roc_auc(labels, probabilities, class_names),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, predictions, labels=present, average=average,
                                                         zero_division=0)
        report[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    absent = [class_names[i] for i in ids if not support[i]]
    report["notes"] = [f"{len(absent)} of {len(class_names)} classes have no images in this split "
                       f"({', '.join(absent)}): their recall, precision and F1 are n/a and the macro averages are "
                       f"over the other {len(present)}"] if absent else []
    if len(class_names) == 2:
        # Positive = class 1, the usual convention for (normal, disease) label orders.
        report["sensitivity"] = float(recall[1]) if support[1] else None
        report["specificity"] = float(recall[0]) if support[0] else None
    report["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed)}
    report["ci95"], report["ci95_methods"] = interval_estimates(labels, probabilities, class_names, groups=groups,
                                                                resamples=bootstrap, seed=seed,
                                                                proportion_method=proportion_method)
    return report


def interval_estimates(labels, probabilities, class_names: list[str], *, groups=None, resamples: int = 1000,
                       seed: int = 0, proportion_method: str = "wilson") -> tuple[dict, dict]:
    """95% intervals and how each was made: → (ci95, methods), both keyed like the report.

    Proportions (accuracy, per-class recall and precision, sensitivity, specificity) get Wilson score (or
    Clopper–Pearson) intervals, valid at 0 and 1 where a percentile bootstrap collapses. Cohen's κ, macro F1 and
    ROC AUC get a BCa bootstrap (`resamples`; none when 0). With `groups` the patient is the unit of both.
    """
    predictions = probabilities.argmax(-1)
    codes = None if groups is None else intervals.group_codes(groups, len(labels))[0]
    correct = predictions == labels

    def proportion(mask, hits):
        return intervals.proportion_entry(hits[mask], None if codes is None else codes[mask], proportion_method)

    entries = {"accuracy": proportion(np.ones(len(labels), bool), correct),
               "recall": {name: proportion(labels == i, correct) for i, name in enumerate(class_names)},
               "precision": {name: proportion(predictions == i, correct) for i, name in enumerate(class_names)}}
    if len(class_names) == 2:
        entries["sensitivity"], entries["specificity"] = (entries["recall"][class_names[k]] for k in (1, 0))
    ci = {key: entry["ci95"] for key, entry in entries.items() if "ci95" in entry}
    ci |= {key: {name: entry["ci95"] for name, entry in entries[key].items()} for key in ("recall", "precision")}
    per_class = intervals.PROPORTION_METHODS[proportion_method] + (
        ", effective n = n / each class's design effect (patients as clusters)" if codes is not None else "")
    methods = {key: {"method": entry["method"] if "method" in entry else per_class,
                     "unit": "patient" if codes is not None else "image", "note": None}
               for key, entry in entries.items()}
    for key, statistic in _bootstrapped_statistics(labels, probabilities, len(class_names)).items():
        if resamples:
            made = intervals.bootstrap_interval(statistic, len(labels), groups=groups, resamples=resamples, seed=seed)
            ci[key] = made["ci95"]
            methods[key] = {name: made[name] for name in ("method", "unit", "note")}
        else:
            ci[key], methods[key] = None, {"method": "none (bootstrap = 0)", "unit": None, "note": None}
    return ci, methods


def _bootstrapped_statistics(labels, probabilities, num_classes: int) -> dict:
    """κ, macro F1 (over the classes present) and macro ROC AUC as functions of (rows, images) multiplicities."""
    predictions = probabilities.argmax(-1)
    cells = np.eye(num_classes * num_classes)[labels * num_classes + predictions]
    present = np.bincount(labels, minlength=num_classes) > 0
    auc_classes = [1] if num_classes == 2 else [k for k in range(num_classes) if present[k]]
    ranked = [paired._rank_prepare(probabilities[:, k], labels == k) for k in auc_classes]

    def confusion(weights):
        return (weights @ cells).reshape(len(weights), num_classes, num_classes)

    def kappa(weights):
        matrix = confusion(weights)
        total = matrix.sum((1, 2))
        observed = np.trace(matrix, axis1=1, axis2=2) / total
        chance = (matrix.sum(2) * matrix.sum(1)).sum(1) / total ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(chance < 1, (observed - chance) / (1 - chance), np.nan)

    def f1_macro(weights):
        matrix = confusion(weights)
        hits, support, predicted = np.diagonal(matrix, axis1=1, axis2=2), matrix.sum(2), matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(support > 0, 2 * hits / (support + predicted), np.nan)  # as the point: present classes
            return np.nanmean(f1, 1)

    def auc_macro(weights):
        aucs = np.stack([paired._weighted_auc(weights, prepared) for prepared in ranked], 1)
        return aucs.mean(1)  # NaN when a class lost all its images or all others: undefined, left out

    statistics = {"cohen_kappa": kappa, "f1_macro": f1_macro}
    if ranked and all(0 < (labels == k).sum() < len(labels) for k in auc_classes):
        statistics["roc_auc_macro"] = auc_macro
    return statistics


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


def apply_operating_point(labels, probabilities, positive: int, threshold: float, class_names: list[str], *,
                          groups=None) -> dict:
    """Positive-vs-rest numbers of the rule `P(positive) >= threshold` (for more than two classes too).

    Its rates are proportions, so their 95% intervals are Wilson's (patients as clusters with `groups`).
    """
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
        **_rate_intervals(is_positive.astype(bool), flagged.astype(bool), groups),
    }


def _rate_intervals(is_positive, flagged, groups) -> dict:
    codes = None if groups is None else intervals.group_codes(groups, len(is_positive))[0]
    hits = is_positive == flagged
    entries = {name: intervals.proportion_entry(hits[mask], None if codes is None else codes[mask])
               for name, mask in (("sensitivity", is_positive), ("specificity", ~is_positive), ("precision", flagged))}
    return {"ci95": {name: entry["ci95"] for name, entry in entries.items()},
            "ci95_method": {"method": entries["sensitivity"]["method"], "unit": entries["sensitivity"]["unit"]}}


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
