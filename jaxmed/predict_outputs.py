"""What `python -m jaxmed.predict` writes: predictions.csv (a row per image: class, probabilities, operating-point
flag, temperature, conformal set, OOD score and flag), skipped.csv, and the summary, with the one-line warning when
most inputs do not look like the training data."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("jaxmed.predict")


def write_outputs(out: Path, predictor, result, ignored: int) -> dict:
    """predictions.csv and skipped.csv; returns the summary (the caller adds to it and writes summary.json)."""
    from jaxmed.evaluate import conformal

    out.mkdir(parents=True, exist_ok=True)
    names, flagged = predictor.class_names, result.flagged
    header = ["path", "prediction", *(f"p_{name}" for name in names), *(["flagged"] if flagged is not None else []),
              "temperature", "prediction_set"]
    sets = ([""] * len(result.paths) if result.prediction_sets is None
            else conformal.set_labels(result.prediction_sets, names))
    rows = [[path, names[int(np.argmax(row))], *(repr(float(p)) for p in row),  # report.write_predictions' format
             *([bool(flagged[index])] if flagged is not None else []), f"{predictor.temperature:g}", sets[index]]
            for index, (path, row) in enumerate(zip(result.paths, result.probabilities))]
    header, rows = _with_ood_columns(header, rows, result)
    _write_csv(out / "predictions.csv", header, rows)
    _write_csv(out / "skipped.csv", ["path", "reason"], result.skipped)
    summary = {"predicted": len(result.paths), "skipped": len(result.skipped), "ignored_non_images": ignored,
               "temperature": predictor.temperature,
               "probabilities": ("softmax(logits / temperature), temperature from calibration.json"
                                 if predictor.calibrated else "softmax(logits), uncalibrated"),
               **predictor.origin, "class_names": names, "out": str(out)}
    if result.flagged is not None:
        summary.update(operating_point=predictor.operating_point, flagged=int(result.flagged.sum()))
    summary.update(_ood_summary(predictor, result))
    if result.prediction_sets is not None:
        summary["conformal"] = conformal.stored_summary(predictor.conformal, result.prediction_sets)
    if predictor.notes:
        summary["notes"] = predictor.notes
    return summary


OOD_WARNING = "most of these images do not look like the training data: is this the right model?"
OOD_WARNING_ABOVE = 0.25  # fraction of inputs out of distribution


def _with_ood_columns(header: list, rows: list, result) -> tuple[list, list]:
    """ood_score (as evaluate's predictions.csv prints it) and out_of_distribution (true/false); empty cells when
    the model has no detectors."""
    if result.ood_scores is None:
        return header + ["ood_score", "out_of_distribution"], [row + ["", ""] for row in rows]
    return header + ["ood_score", "out_of_distribution"], [
        row + [f"{score:.9g}", "true" if flag else "false"]
        for row, score, flag in zip(rows, result.ood_scores, result.out_of_distribution)]


def _ood_summary(predictor, result) -> dict:
    """How many inputs are out of distribution, by which detector; the warning when that is most of them."""
    if predictor.ood is None:
        return {"out_of_distribution": None}
    fitted, count = predictor.ood, int(np.sum(result.out_of_distribution)) if result.paths else 0
    summary = {"out_of_distribution": count, "ood": {"method": fitted.method, "threshold": fitted.thresholds[
        fitted.method], "keep": fitted.meta.get("keep"), "fitted_for": fitted.meta.get("checkpoint")}}
    if result.paths and count > OOD_WARNING_ABOVE * len(result.paths):
        summary["warning"] = f"{count} of {len(result.paths)} inputs are out of distribution: {OOD_WARNING}"
        log.warning("%s", summary["warning"])
    return summary


def _write_csv(path: Path, header, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())
