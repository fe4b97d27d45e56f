"""Is one run better than another? Side-by-side metrics with intervals, and paired tests, over finished runs.

    python -m jaxmed.compare W1 W2 [W3 ...] --out DIR [--split test] [--names A,B,...] [--bootstrap 1000] [--seed 0]

Reads each run's W/eval/<split>/predictions.csv (jaxmed.evaluate writes it, also at the end of training) and pairs
the rows by image id. DIR gets comparison.json and comparison.md (every run's accuracy, balanced accuracy, Cohen's
κ, macro F1, macro ROC AUC and per-class recall with bootstrap 95% intervals, plus its size and speed from
W/train_summary.json), for every pair McNemar's exact test, paired-bootstrap intervals of the differences and, for
two classes, DeLong's test of the AUC difference; verdicts.txt (one plain-language line per pair), roc_curves.png
(all runs overlaid), differences.png (a forest plot of the paired differences) and comparison.html (all of it in
one self-contained page).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from jaxmed.errors import JaxmedError
from jaxmed.evaluate import compare_figures, html, intervals, metrics, paired
from jaxmed.evaluate.report import groups_for, read_predictions

log = logging.getLogger("jaxmed.compare")

# The run-level table: (key in comparison.json, label for people).
RUN_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("cohen_kappa", "Cohen's κ"),
               ("f1_macro", "macro F1"), ("roc_auc_macro", "macro ROC AUC"))
# The paired differences, as paired.paired_bootstrap names them.
PAIRED_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                  ("roc_auc_macro", "macro ROC AUC"))
TRAINING_KEYS = ("parameters", "train_seconds", "images_per_second")
_EXAMPLE_IDS = 3  # image ids named in an error about mismatched image sets


@dataclasses.dataclass
class RunPredictions:
    """One run's predictions on one split, rows in the order of the first run once aligned."""
    name: str
    workdir: Path
    ids: list[str]
    labels: np.ndarray  # (N,) class indices
    probabilities: np.ndarray  # (N, classes), as recorded in predictions.csv
    class_names: list[str]
    training: dict | None  # W/train_summary.json's parameters, train_seconds, images_per_second; None if absent
    conformal: dict | None = None  # coverage and mean set size from W/eval/<split>/report.json; None if absent


def compare(workdirs, out, *, split: str = "test", names=None, resamples: int = 1000, seed: int = 0) -> dict:
    """The CLI's work: load, align, score, test every pair, write DIR's files; → the one-line summary."""
    if len(workdirs) < 2:
        raise JaxmedError(f"need at least two runs to compare; got {len(workdirs)} ({', '.join(map(str, workdirs))})"
                          if workdirs else "need at least two runs to compare; got none")
    if resamples < 1:
        raise JaxmedError(f"--bootstrap={resamples} must be at least 1 (resamples for the 95% intervals)")
    workdirs = [Path(w).expanduser() for w in workdirs]
    run_names = choose_names(workdirs, names)
    runs = align([load_run(workdir, split, name) for workdir, name in zip(workdirs, run_names)])
    groups = groups_for(runs[0].ids, runs[0].workdir / "splits.csv")  # patients make the unit of every interval
    comparison = score(runs, split=split, resamples=resamples, seed=seed, groups=groups)

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown(comparison))
    (out / "verdicts.txt").write_text("".join(pair["verdict"] + "\n" for pair in comparison["pairs"]))
    compare_figures.roc_overlay([run.name for run in runs], runs[0].labels, [run.probabilities for run in runs],
                                runs[0].class_names,
                                [row["metrics"]["roc_auc_macro"]["value"] for row in comparison["runs"]],
                                out / "roc_curves.png")
    compare_figures.differences(comparison["pairs"], _paired_labels(runs[0].class_names), out / "differences.png")
    html.write_comparison_html(out, comparison)
    for pair in comparison["pairs"]:
        log.info("%s", pair["verdict"])
    log.info("compared %d runs on %d %s images → %s", len(runs), comparison["num_examples"], split, out)
    return summary(comparison, out)


def choose_names(workdirs: list[Path], names) -> list[str]:
    """--names A,B,… when given, else each workdir's basename, lengthened to parent/basename where two collide."""
    if names is not None:
        chosen = [name.strip() for name in (names.split(",") if isinstance(names, str) else names)]
        if len(chosen) != len(workdirs) or not all(chosen):
            raise JaxmedError(f"--names has {len(chosen)} names ({','.join(chosen)}) for {len(workdirs)} runs; give "
                              "one non-empty name per workdir, comma-separated, in the same order")
        if len(set(chosen)) < len(chosen):
            raise JaxmedError(f"--names repeats a name ({','.join(chosen)}); each run needs its own")
        return chosen
    parts = [Path(os.path.abspath(w)).parts for w in workdirs]  # not resolve(): a symlink's own name is the name
    for depth in range(1, max(map(len, parts)) + 1):
        chosen = ["/".join(p[-depth:]) for p in parts]
        if len(set(chosen)) == len(chosen):
            return chosen
    repeated = sorted({str(w) for w, p in zip(workdirs, parts) if parts.count(p) > 1})
    raise JaxmedError(f"the same run is given twice: {', '.join(repeated)}")


def load_run(workdir: Path, split: str, name: str) -> RunPredictions:
    """W/eval/<split>/predictions.csv and W/train_summary.json, with errors that say which run and what to do."""
    if not workdir.is_dir():
        raise JaxmedError(f"{workdir} is not a directory; pass the --workdir of finished jaxmed.main runs")
    from jaxmed.workdirs import check_not_cv_parent, evaluate_advice

    check_not_cv_parent(workdir)
    if not (workdir / "config.json").is_file():
        raise JaxmedError(f"{workdir} is not a jaxmed run (no config.json): pass the --workdir given to jaxmed.main")
    path = workdir / "eval" / split / "predictions.csv"
    if not path.is_file():
        evaluated = sorted(p.parent.name for p in (workdir / "eval").glob("*/predictions.csv"))
        has = f"it has predictions for {', '.join(evaluated)}" if evaluated else "it has no evaluation yet"
        raise JaxmedError(f"run {name} has no {split} predictions ({path} is missing; {has}); "
                          f"{evaluate_advice(workdir, split)}")
    ids, labels, probabilities, class_names = _read(path)
    return RunPredictions(name, workdir, ids, labels, probabilities, class_names,
                          _training_summary(workdir / "train_summary.json"), _conformal_summary(path.parent))


def align(runs: list[RunPredictions]) -> list[RunPredictions]:
    """Every run's rows reordered to the first run's image order, after checking they scored the same images.

    Rows are matched by image id, never by position: two evaluations may list the same images in another order.
    """
    first = runs[0]
    for run in runs[1:]:
        if run.class_names != first.class_names:
            order = " (the same classes in another order)" if sorted(run.class_names) == sorted(first.class_names) \
                else ""
            raise JaxmedError(f"runs {first.name} and {run.name} have different classes{order}: {first.name} has "
                              f"{first.class_names}, {run.name} has {run.class_names}; only runs of the same task "
                              "can be compared")
        mine, theirs = set(first.ids), set(run.ids)
        if mine != theirs:
            only_first, only_run = sorted(mine - theirs), sorted(theirs - mine)
            parts = [f"{a} has {len(ids)} images that {b} lacks (e.g. {', '.join(ids[:_EXAMPLE_IDS])})"
                     for a, b, ids in ((first.name, run.name, only_first), (run.name, first.name, only_run)) if ids]
            raise JaxmedError(f"runs {first.name} and {run.name} were not evaluated on the same images: "
                              f"{'; '.join(parts)}; compare runs evaluated on the same split of the same data")
    position = {image_id: row for row, image_id in enumerate(first.ids)}
    aligned = [first]
    for run in runs[1:]:
        order = np.empty(len(run.ids), np.int64)
        order[[position[image_id] for image_id in run.ids]] = np.arange(len(run.ids))
        run = dataclasses.replace(run, ids=list(first.ids), labels=run.labels[order],
                                  probabilities=run.probabilities[order])
        disagree = np.flatnonzero(run.labels != first.labels)
        if len(disagree):
            names = first.class_names
            examples = ", ".join(f"{first.ids[i]} ({first.name}: {names[first.labels[i]]}, {run.name}: "
                                 f"{names[run.labels[i]]})" for i in disagree[:_EXAMPLE_IDS])
            raise JaxmedError(f"runs {first.name} and {run.name} give {len(disagree)} images different true labels, "
                              f"e.g. {examples}; they were evaluated on differently labelled data")
        aligned.append(run)
    return aligned


def score(runs: list[RunPredictions], *, split: str, resamples: int, seed: int, groups=None) -> dict:
    """comparison.json: the run table and every pair's tests, as plain JSON values (None where undefined).

    With more than two runs every pair is a test, so the chance of a false winner grows with the number of pairs:
    each family of p-values (accuracy; AUC) is Holm-adjusted, both are reported, and the verdicts use the adjusted.
    """
    labels, class_names = runs[0].labels, runs[0].class_names
    table = []
    for run in runs:
        table.append({"name": run.name, "workdir": str(run.workdir),
                      "metrics": run_metrics(labels, run.probabilities, class_names, resamples=resamples, seed=seed,
                                             groups=groups),
                      "training": run.training, "conformal": run.conformal})
    pairs = [compare_pair(a, b, resamples=resamples, seed=seed, groups=groups)
             for a, b in itertools.combinations(runs, 2)]
    for key in ("accuracy_test", "auc_test"):
        tests = [pair[key] for pair in pairs if pair.get(key)]
        if len(runs) > 2:
            paired.holm(tests)
    for pair in pairs:
        paired.pair_verdicts(pair, class_names)
    return {"split": split, "num_examples": int(len(labels)), "class_names": list(class_names),
            "bootstrap": {"resamples": int(resamples), "seed": int(seed)},
            "unit": "patient" if groups is not None else "image",
            "multiplicity": "Holm over the pairs" if len(runs) > 2 else None, "runs": table, "pairs": pairs}


def run_metrics(labels, probabilities, class_names: list[str], *, resamples: int = 1000, seed: int = 0,
                groups=None) -> dict:
    """{metric: {"value", "ci95"}} plus "recall": {class: {"value", "ci95"}} for one run.

    Point values are metrics.classification_metrics' (so they match the run's report.json). Accuracy and recall
    are proportions, with its Wilson intervals; the others are percentile intervals over `resamples` resamples of
    the images (patients with `groups`), drawn exactly as paired.paired_bootstrap draws them for the same seed, so
    every run and every pair is scored on the same resampled test sets. A class absent from the split has no
    recall (None), not a recall of 0.
    """
    report = metrics.classification_metrics(labels, probabilities, class_names, bootstrap=0, groups=groups)
    values = {"accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
              "cohen_kappa": report["cohen_kappa"], "f1_macro": report["macro"]["f1"],
              "roc_auc_macro": report["roc_auc"]["macro"]}
    draws = bootstrap_draws(labels, probabilities, len(class_names), resamples=resamples, seed=seed, groups=groups)
    unit = "patient" if groups is not None else "image"
    result = {key: {"value": values[key], "ci95": _interval(draws[key]) if values[key] is not None else None,
                    "method": "percentile bootstrap", "unit": unit} for key, _ in RUN_METRICS}
    result["accuracy"] |= {"ci95": report["ci95"]["accuracy"], **report["ci95_methods"]["accuracy"]}
    result["recall"] = {}
    for name in class_names:
        present = report["per_class"][name]["support"] > 0
        result["recall"][name] = {"value": report["per_class"][name]["recall"] if present else None,
                                  "ci95": report["ci95"]["recall"][name] if present else None,
                                  "support": report["per_class"][name]["support"]}
    return result


def bootstrap_draws(labels, probabilities, num_classes: int, *, resamples: int, seed: int, groups=None) -> dict:
    """Each metric on each resample: {"accuracy": (R,), …, "recall": (R, classes)}; NaN where undefined.

    A resample is a row of image multiplicities; its confusion matrix comes from one reduceat over the images
    sorted by (true, predicted) cell, and its AUCs from paired's rank formula, so no per-resample Python loop.
    """
    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    n = len(labels)
    cells = labels * num_classes + probabilities.argmax(-1)
    cell_order = np.argsort(cells, kind="mergesort")
    cell_starts = np.flatnonzero(np.r_[True, np.diff(cells[cell_order]) != 0])
    present_cells = cells[cell_order][cell_starts]
    auc_classes = [1] if num_classes == 2 else list(range(num_classes))
    ranked = [paired._rank_prepare(probabilities[:, k], labels == k) for k in auc_classes]

    out = {key: [] for key in ("accuracy", "balanced_accuracy", "cohen_kappa", "f1_macro", "roc_auc_macro", "recall")}
    for weights in paired.resampled_weights(intervals.group_codes(groups, n)[0], resamples, seed):  # paired's draws
        size = len(weights)
        confusion = np.zeros((size, num_classes * num_classes))
        confusion[:, present_cells] = np.add.reduceat(weights[:, cell_order], cell_starts, axis=1)
        for key, value in _from_confusions(confusion.reshape(size, num_classes, num_classes)).items():
            out[key].append(value)
        # Macro AUC as metrics.roc_auc: the mean over the classes with both outcomes in the resample.
        aucs = np.stack([paired._weighted_auc(weights, prepared) for prepared in ranked], 1)
        defined = ~np.isnan(aucs)
        out["roc_auc_macro"].append(np.where(defined.any(1), np.where(defined, aucs, 0.0).sum(1)
                                             / np.maximum(defined.sum(1), 1), np.nan))
    return {key: np.concatenate(chunks) for key, chunks in out.items()}


def _from_confusions(confusion) -> dict:
    """Accuracy, balanced accuracy, κ, macro F1 and recall per resampled (true × predicted) matrix, as sklearn."""
    total = confusion.sum((1, 2))
    true_positives = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted = confusion.sum(2), confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, true_positives / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * true_positives / (support + predicted), 0.0)
        accuracy = true_positives.sum(1) / total
        chance = (support * predicted).sum(1) / total ** 2
        kappa = np.where(chance < 1, (accuracy - chance) / (1 - chance), np.nan)
        balanced = np.nanmean(recall, 1)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "cohen_kappa": kappa, "f1_macro": f1.mean(1),
            "recall": recall}


def compare_pair(a: RunPredictions, b: RunPredictions, *, resamples: int, seed: int, groups=None) -> dict:
    """McNemar, the paired bootstrap of the differences, DeLong for two classes; the tests the verdicts use.

    Independent images: accuracy is decided by the exact McNemar test with its own exact conditional interval, and
    AUC by DeLong. Images grouped by patient: both tests assume independent images, so the decision is the
    patient-level paired bootstrap's (its p agrees with its interval); McNemar and DeLong are kept for reference.
    """
    labels, n = a.labels, len(a.labels)
    correct = [run.probabilities.argmax(-1) == labels for run in (a, b)]
    mcnemar = paired.mcnemar_exact(*correct)
    bootstrap = paired.paired_bootstrap(labels, a.probabilities, b.probabilities, resamples=resamples, seed=seed,
                                        groups=groups)
    pair = {"a": a.name, "b": b.name, "num_examples": n, "mcnemar": mcnemar, "paired_bootstrap": bootstrap,
            "delong": None}
    if groups is None:
        pair["accuracy_test"] = {"test": "McNemar", "pvalue": mcnemar["pvalue"], "difference": mcnemar["difference"],
                                 "ci95": mcnemar["ci95"], "method": mcnemar["ci95_method"], "unit": "image"}
    else:
        pair["accuracy_test"] = paired.bootstrap_test(bootstrap["accuracy"], "McNemar")
    if len(a.class_names) == 2:
        try:
            pair["delong"] = paired.delong(labels, a.probabilities[:, 1], b.probabilities[:, 1])
        except ValueError as error:  # too few positives or negatives for a variance: say so, compare the rest
            pair["delong_skipped"] = str(error)
        else:
            test = pair["delong"]
            pair["auc_test"] = ({"test": "DeLong", "pvalue": test["pvalue"], "difference": test["difference"],
                                 "ci95": test["ci95"], "method": "DeLong's normal approximation", "unit": "image",
                                 "reason": test["no_test_reason"]} if groups is None
                                else paired.bootstrap_test(bootstrap["roc_auc_macro"], "DeLong"))
    return pair


def summary(comparison: dict, out: Path) -> dict:
    """The one JSON line the CLI prints: where the files are and every pair's headline numbers."""
    pairs = []
    for pair in comparison["pairs"]:
        bootstrap = pair["paired_bootstrap"]
        row = {"a": pair["a"], "b": pair["b"], "mcnemar_p": pair["mcnemar"]["pvalue"],
               "accuracy_test": pair["accuracy_test"]["test"], "accuracy_p": pair["accuracy_test"]["pvalue"],
               "accuracy_p_holm": pair["accuracy_test"].get("adjusted_pvalue")}
        for key, _ in PAIRED_METRICS:
            row[f"{key}_difference"] = bootstrap[key]["difference"]
            row[f"{key}_ci95"] = bootstrap[key]["ci95"]
        if pair["delong"] is not None:
            row["delong_p"] = pair["delong"]["pvalue"]
        row["verdict"] = pair["verdict"]
        pairs.append(row)
    return {"out": str(out), "split": comparison["split"], "num_examples": comparison["num_examples"],
            "runs": [run["name"] for run in comparison["runs"]], "pairs": pairs}


def markdown(comparison: dict) -> str:
    """comparison.json for people: the runs side by side, then every pair's differences, tests and verdict."""
    runs, names = comparison["runs"], comparison["class_names"]
    binary = len(names) == 2
    boot, unit = comparison["bootstrap"], comparison.get("unit", "image")
    lines = [f"# {len(runs)} runs compared on {comparison['split']}: {comparison['num_examples']} images, "
             f"{len(names)} classes", "",
             f"Values with 95% intervals: accuracy and recall Wilson score"
             f"{' (effective n = n / design effect, patients as clusters)' if unit == 'patient' else ''}; the others "
             f"percentile bootstrap over {boot['resamples']} resamples of the {unit}s (seed {boot['seed']}), the same "
             "resamples for every run. Predictions are the arg-max of each run's predictions.csv."
             + (f" With {len(runs)} runs every pair is a test: p-values are Holm-adjusted and the verdicts use the "
                "adjusted ones." if comparison.get("multiplicity") else ""), "",
             "| | " + " | ".join(run["name"] for run in runs) + " |", "|---|" + "---|" * len(runs)]
    for key, label in RUN_METRICS:
        if key == "roc_auc_macro" and binary:
            label = f"ROC AUC ({names[1]})"
        lines.append(f"| {label} | " + " | ".join(_with_interval(run["metrics"][key]) for run in runs) + " |")
    for name in names:
        lines.append(f"| recall: {name} | " + " | ".join(_with_interval(run["metrics"]["recall"][name])
                                                          for run in runs) + " |")
    for key, label in (("parameters", "parameters"), ("train_seconds", "train time"),
                       ("images_per_second", "train images / s")):
        lines.append(f"| {label} | " + " | ".join(_training(run["training"], key) for run in runs) + " |")
    lines += _conformal_rows(runs)
    lines += ["", f"## Paired differences A − B (percentage points, paired-bootstrap 95% interval, {unit}s "
              "resampled)", "",
              "| A − B | " + " | ".join(label for _, label in _paired_labels(names))
              + " | McNemar (only A right / only B right) |" + (" DeLong |" if binary else "")
              + " accuracy test: interval, p (Holm) |",
              "|---|" + "---|" * (len(PAIRED_METRICS) + 2 + binary)]
    for pair in comparison["pairs"]:
        bootstrap, test = pair["paired_bootstrap"], pair["mcnemar"]
        cells = [_difference(bootstrap[key]) for key, _ in PAIRED_METRICS]
        cells.append(f"{paired.format_pvalue(test['pvalue'])} ({test['b']} / {test['c']})")
        if binary:
            cells.append(paired.format_pvalue(pair["delong"]["pvalue"]) if pair["delong"] else "n/a")
        deciding = pair["accuracy_test"]
        adjusted = deciding.get("adjusted_pvalue")
        cells.append(f"{deciding['test']}: {_difference(deciding)}, {paired.format_pvalue(deciding['pvalue'])}"
                     + (f" ({paired.format_pvalue(adjusted)[2:]})" if "adjusted_pvalue" in deciding else ""))
        lines.append(f"| {pair['a']} − {pair['b']} | " + " | ".join(cells) + " |")
    methods = {pair["accuracy_test"]["method"] for pair in comparison["pairs"]}
    lines += ["", "Accuracy-test intervals: " + "; ".join(sorted(methods)) + "."]
    lines += ["", "## Verdicts", ""]
    for pair in comparison["pairs"]:
        lines.append(f"- {pair['verdict']}")
        if pair.get("auc_verdict"):
            lines.append(f"- {pair['auc_verdict']}")
        for key in ("accuracy_test", "auc_test"):
            if (pair.get(key) or {}).get("note"):
                lines.append(f"- {pair['a']} vs {pair['b']}: {pair[key]['note']}, so the call is the "
                             f"{pair[key]['test']}'s")
        if pair.get("delong_skipped"):
            lines.append(f"- {pair['a']} vs {pair['b']}: no DeLong test ({pair['delong_skipped']})")
    lines += ["", "Figures: roc_curves.png (every run's ROC curve), differences.png (the paired differences above).",
              ""]
    return "\n".join(lines)


def _paired_labels(class_names: list[str]) -> list[tuple[str, str]]:
    """PAIRED_METRICS, where for two classes the "macro" AUC is said to be the positive class's (class 1)."""
    if len(class_names) != 2:
        return list(PAIRED_METRICS)
    return [(key, f"ROC AUC ({class_names[1]})" if key == "roc_auc_macro" else label) for key, label in PAIRED_METRICS]


def _read(path: Path):
    """predictions.csv → ids, labels, probabilities, class names; a damaged file is named, not a traceback."""
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    probability_columns = [column for column in header[3:] if column.startswith("p_")]
    if header[:3] != ["id", "label", "prediction"] or len(probability_columns) < 2 or \
            header[3:3 + len(probability_columns)] != probability_columns:  # then logit_<class>…, later columns
        raise JaxmedError(f"{path} is not a predictions file written by jaxmed.evaluate (expected the columns id, "
                          f"label, prediction, p_<class>… [logit_<class>…]; got {', '.join(header[:6]) or 'nothing'})")
    try:
        ids, labels, probabilities, class_names = read_predictions(path)
    except (ValueError, IndexError) as error:
        raise JaxmedError(f"{path} could not be read ({error}); re-run python -m jaxmed.evaluate for it") from None
    if not ids:
        raise JaxmedError(f"{path} has no rows: the run was evaluated on no images")
    if len(set(ids)) < len(ids):
        seen, repeated = set(), []
        for image_id in ids:
            if image_id in seen:
                repeated.append(image_id)
            seen.add(image_id)
        raise JaxmedError(f"{path} lists {len(repeated)} image ids more than once (e.g. "
                          f"{', '.join(repeated[:_EXAMPLE_IDS])}); images are paired by id, so each must be unique")
    if not np.isfinite(probabilities).all():
        raise JaxmedError(f"{path} has probabilities that are not finite numbers")
    return ids, labels, probabilities, class_names


def _conformal_summary(eval_dir: Path) -> dict | None:
    """The conformal section of the run's report.json on this split (coverage, mean set size); None if absent."""
    try:
        section = json.loads((eval_dir / "report.json").read_text()).get("conformal")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(section, dict) or not isinstance(section.get("coverage"), dict):
        return None
    return {"method": section.get("method"), "alpha": section.get("alpha"), "mondrian": section.get("mondrian"),
            "calibration_split": section.get("calibration_split"), "coverage": section["coverage"],
            "mean_set_size": section.get("mean_set_size")}


def _conformal_rows(runs: list[dict]) -> list[str]:
    """Each run's conformal coverage and mean set size (each run's own alpha and method), beside its accuracy."""
    if not any(run.get("conformal") for run in runs):
        return []
    cells = [(run.get("conformal") or {}) for run in runs]
    return ["| conformal coverage | " + " | ".join(
                f"{_with_interval(c['coverage'])} ({c['method']}, α = {c['alpha']:g})" if c else "n/a"
                for c in cells) + " |",
            "| mean set size | " + " | ".join(f"{c['mean_set_size']:.2f}" if c else "n/a" for c in cells) + " |"]


def _training_summary(path: Path) -> dict | None:
    """Size and speed of the run; a missing or unreadable file is "n/a" in the table, never a failure."""
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None
    if not isinstance(recorded, dict):
        return None
    return {key: recorded.get(key) if isinstance(recorded.get(key), (int, float)) else None for key in TRAINING_KEYS}


def _interval(values) -> list[float] | None:
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _with_interval(entry: dict) -> str:
    if entry["value"] is None:
        return "n/a"
    interval = entry["ci95"]
    return f"{entry['value']:.4f}" + (f" ({interval[0]:.4f}–{interval[1]:.4f})" if interval else "")


def _difference(entry: dict) -> str:
    if entry["difference"] is None:
        return "n/a"
    interval = entry["ci95"]
    text = paired._signed(100 * entry["difference"])
    return text + (f" [{paired._signed(100 * interval[0])}, {paired._signed(100 * interval[1])}]" if interval else "")


def _training(training: dict | None, key: str) -> str:
    value = (training or {}).get(key)
    if value is None:
        return "n/a"
    if key == "parameters":
        return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{int(value):,}"
    if key == "train_seconds":
        return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else \
            f"{value / 3600:.1f} h"
    return f"{value:.1f}" if math.isfinite(value) else "n/a"
