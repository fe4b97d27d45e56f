"""eval/<split>/predictions.csv: written at full precision (with logits, the conformal set and OOD columns) by every
evaluation, and read back by compare and pooled cross-validation, older 6-digit files included."""

from __future__ import annotations

import csv
import io
import logging

import numpy as np

log = logging.getLogger("jaxmed.evaluate")


def write_predictions(path, ids, labels, probabilities, class_names, logits=None, *, prediction_sets=None,
                      extra_columns: dict | None = None) -> None:
    """One row per image: id, true and predicted class, each class's probability and (when given) logit, the
    conformal prediction set (class names joined by '|') when given, then `extra_columns` ({header: one text cell
    per image}, e.g. ood_score).

    Numbers are written as Python's repr, the shortest text that reads back to the same float64, so compare and
    the pooled cross-validation re-read exactly what was scored (6 digits turned 0.9999996 into 1 and made ties);
    the logits let a later recalibration start from the model's own numbers.
    """
    extra_columns = extra_columns or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    logit_columns = [f"logit_{name}" for name in class_names] if logits is not None else []
    sets = ["prediction_set"] if prediction_sets is not None else []
    writer.writerow(["id", "label", "prediction", *(f"p_{name}" for name in class_names), *logit_columns, *sets,
                     *extra_columns])
    logits = np.asarray(logits, np.float64) if logits is not None else [()] * len(labels)
    for index, (image_id, label, row, logit_row) in enumerate(zip(ids, labels, np.asarray(probabilities, np.float64),
                                                                   logits)):
        writer.writerow([image_id, class_names[label], class_names[int(np.argmax(row))],
                         *(repr(float(p)) for p in row), *(repr(float(v)) for v in logit_row),
                         *([prediction_sets[index]] if sets else []),
                         *(cells[index] for cells in extra_columns.values())])
    path.write_text(buffer.getvalue())


def read_predictions(path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """predictions.csv → (ids, labels as class indices, probabilities (N, classes), class names).

    Reads the files of earlier versions too (6 significant digits, no logit columns).
    """
    ids, labels, probabilities, _, names = read_predictions_with_logits(path)
    return ids, labels, probabilities, names


def read_predictions_with_logits(path):
    """predictions.csv → (ids, labels, probabilities, logits or None for files without them, class names)."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    probability_columns = [i for i, column in enumerate(header) if i >= 3 and column.startswith("p_")]
    logit_columns = [i for i, column in enumerate(header) if i >= 3 and column.startswith("logit_")]
    names = [header[i][2:] for i in probability_columns]
    ids = [row[0] for row in rows]
    labels = np.asarray([names.index(row[1]) for row in rows], np.int64)

    def numbers(columns):
        return np.asarray([[float(row[i]) for i in columns] for row in rows], np.float64).reshape(-1, len(columns))

    logits = numbers(logit_columns) if len(logit_columns) == len(names) else None
    probabilities = numbers(probability_columns)
    # Files from before full precision: rounding can tie the top two classes, and a tie breaks to the first.
    differ = sum(names[int(k)] != row[2] for k, row in zip(probabilities.argmax(-1), rows))
    if differ:
        log.warning("%s: %d rows' recorded prediction is not the arg-max of their (rounded) probabilities; re-run "
                    "python -m jaxmed.evaluate to write full-precision values", path, differ)
    return ids, labels, probabilities, logits, names


def groups_for(ids, *splits_csvs):
    """The patient of each image id from W/splits.csv files (data.group_pattern), or None when any image has none:
    then the image is the unit of every interval."""
    found = {}
    for path in splits_csvs:
        try:
            with open(path, newline="") as handle:
                found |= {row["id"]: row["group"] for row in csv.DictReader(handle) if row.get("group")}
        except FileNotFoundError:
            continue
    if not ids or not all(found.get(image_id) for image_id in ids):
        return None
    return np.asarray([found[image_id] for image_id in ids], dtype=object)
