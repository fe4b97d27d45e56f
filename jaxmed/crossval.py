"""Cross-validation (`train.folds=K`): K normal runs on stratified (by patient when data.group_pattern is set) folds
of train+val in W/fold_<k>/, each holding its fold out as its test split, then W/cv/: every metric's mean, sd and
per-fold values, and the metrics and figures of the pooled out-of-fold predictions.

Each fold is an ordinary run directory: a fold stopped by SIGTERM resumes like any run, and finished folds (their
W/fold_<k>/eval/test/report.json exists) are not retrained.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

from jaxmed import experiment
from jaxmed.errors import JaxmedError
from jaxmed.evaluate import calibration, figures, html, metrics, report
from jaxmed.train.checkpoint import workdir_path

log = logging.getLogger("jaxmed.crossval")

# The per-fold numbers summarised: (name, path into report.json)
SUMMARISED = (("accuracy", ("accuracy",)), ("balanced_accuracy", ("balanced_accuracy",)),
              ("cohen_kappa", ("cohen_kappa",)), ("f1_macro", ("macro", "f1")), ("roc_auc_macro", ("roc_auc", "macro")),
              ("ece_15", ("calibration", "after", "ece_15")), ("temperature", ("calibration", "temperature")))


def fold_config(config, fold: int):
    """The config of fold `fold`: an ordinary single run whose data hold that fold out as test."""
    folded = config.copy_and_resolve_references()
    folded.train.folds = 0
    folded.train.evaluate_test = True  # the held-out fold's evaluation is the fold's result
    folded.data.cv_folds = config.train.folds
    folded.data.cv_fold = fold
    return folded


def cross_validate(config, workdir) -> dict:
    folds = config.train.folds
    if folds < 2:
        raise JaxmedError(f"train.folds={folds}: cross-validation needs at least 2 folds (0 turns it off)")
    workdir = workdir_path(workdir)
    for fold in range(folds):
        fold_dir = workdir / f"fold_{fold}"
        if (fold_dir / "eval/test/report.json").exists():
            log.info("fold %d of %d: finished earlier (%s), not retrained", fold + 1, folds, fold_dir)
            continue
        log.info("fold %d of %d → %s", fold + 1, folds, fold_dir)
        folded = fold_config(config, fold)
        if jax.process_index() == 0:
            fold_dir.mkdir(parents=True, exist_ok=True)
            (fold_dir / "config.json").write_text(folded.to_json_best_effort(indent=2) + "\n")
        result = experiment.train_and_evaluate(folded, fold_dir)
        if "preempted_at" in result:
            return {**result, "fold": fold}  # preempted_at, and the signal
    summary = summarise(workdir, folds, config.eval)
    return {"folds": folds, "summary": str(workdir / "cv" / "summary.json"),
            **{f"{name}_mean": summary["metrics"][name]["mean"] for name in ("accuracy", "balanced_accuracy")}}


def summarise(workdir, folds: int, eval_config) -> dict:
    """W/cv/summary.json|md and the pooled out-of-fold figures, from the folds' reports and predictions."""
    reports = [json.loads((workdir / f"fold_{fold}/eval/test/report.json").read_text()) for fold in range(folds)]
    per_metric = {}
    for name, path in SUMMARISED:
        values = [_at(fold_report, path) for fold_report in reports]
        defined = [value for value in values if value is not None]
        per_metric[name] = {"mean": float(np.mean(defined)) if defined else None,
                            "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None, "values": values}
    notes = []
    for class_name in reports[0]["class_names"]:
        # A fold without the class has no recall for it (older reports wrote 0): n/a, left out of the mean.
        values = [row["recall"] if row["support"] else None
                  for row in (fold_report["per_class"][class_name] for fold_report in reports)]
        defined = [value for value in values if value is not None]
        per_metric[f"recall/{class_name}"] = {"mean": float(np.mean(defined)) if defined else None,
                                              "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
                                              "values": values}
        if len(defined) < folds:
            notes.append(f"{class_name} is absent from {folds - len(defined)} of {folds} folds' test splits: its "
                         f"recall mean is over the {len(defined)} folds that have it")
    ids, labels, probabilities, names = [], [], [], None
    for fold in range(folds):
        fold_ids, fold_labels, fold_probabilities, names = report.read_predictions(
            workdir / f"fold_{fold}/eval/test/predictions.csv")
        ids += fold_ids
        labels.append(fold_labels)
        probabilities.append(fold_probabilities)
    labels, probabilities = np.concatenate(labels), np.concatenate(probabilities)
    if len(set(ids)) != len(ids):
        raise JaxmedError(f"the folds' test splits overlap in {workdir}: an image was held out twice")
    groups = report.groups_for(ids, *(workdir / f"fold_{fold}" / "splits.csv" for fold in range(folds)))
    pooled = metrics.classification_metrics(labels, probabilities, names, bootstrap=eval_config.bootstrap,
                                            seed=eval_config.seed, groups=groups,
                                            proportion_method=getattr(eval_config, "proportion_interval", "wilson"))
    pooled["calibration"] = calibration.calibration_metrics(labels, probabilities)
    summary = {"folds": folds, "metrics": per_metric, "pooled": pooled, "notes": notes,
               "images_per_fold": [fold_report["num_examples"] for fold_report in reports]}
    out = workdir / "cv"
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(markdown(summary))
        figures.confusion_matrix(np.asarray(pooled["confusion_matrix"]), names, out / "confusion_matrix.png")
        figures.roc_curves(labels, probabilities, names, out / "roc_curves.png")
        figures.pr_curves(labels, probabilities, names, out / "pr_curves.png")
        calibration.reliability_diagram(labels, probabilities, out / "reliability_diagram.png",
                                        title="Reliability of the pooled out-of-fold predictions")
        html.write_cv_html(out, summary)
        log.info("%d-fold cross-validation: accuracy %.4f ± %.4f (pooled %.4f) → %s", folds,
                 per_metric["accuracy"]["mean"], per_metric["accuracy"]["sd"] or 0.0, pooled["accuracy"], out)
    return summary


def markdown(summary: dict) -> str:
    folds = summary["folds"]
    lines = [f"# {folds}-fold cross-validation", "",
             f"Each fold held out {', '.join(map(str, summary['images_per_fold']))} images of train+val.", "",
             "| metric | mean | sd | " + " | ".join(f"fold {k}" for k in range(folds)) + " |",
             "|---|---|---|" + "---|" * folds]
    for name, row in summary["metrics"].items():
        lines.append(f"| {name} | {report.format_number(row['mean'])} | {report.format_number(row['sd'])} | "
                     + " | ".join(report.format_number(value) for value in row["values"]) + " |")
    pooled = summary["pooled"]
    lines += ["", f"## Pooled out-of-fold predictions ({pooled['num_examples']} images)", "",
              f"- accuracy: {pooled['accuracy']:.4f}"
              + (f" (95% CI {pooled['ci95']['accuracy'][0]:.4f}–{pooled['ci95']['accuracy'][1]:.4f})"
                 if pooled.get("ci95") else ""),
              f"- balanced accuracy: {pooled['balanced_accuracy']:.4f}",
              f"- macro F1: {pooled['macro']['f1']:.4f}",
              f"- ROC AUC (macro): {report.format_number(pooled['roc_auc']['macro'])}",
              f"- ECE (15 bins): {pooled['calibration']['ece_15']:.4f}", ""]
    lines += [f"Note: {note}." for note in summary.get("notes") or []]
    lines += report.interval_methods_lines(pooled.get("ci95_methods"))
    return "\n".join(lines)


def _at(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree
