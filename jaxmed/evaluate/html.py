"""One self-contained HTML page per evaluation, comparison or cross-validation: W/eval/<split>/report.html,
DIR/comparison.html and W/cv/summary.html.

A page is a single file to mail or attach to a ticket: figures are embedded as base64 PNG data URIs, the CSS is
inline, there is no script and no external URL. Every number taken from the JSON it renders carries
`data-key="<dotted.path>"` (e.g. `ci95.accuracy.0`, `per_class.glioma.recall`), printed as report.md prints it
(4 decimals), so tests and scripts can read the numbers back from the DOM. Sections whose data is absent are left
out rather than failing: reports from older runs lack calibration, runs without `eval.positive_class` lack an
operating point.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

MISCLASSIFIED_ROWS = 50  # rows of the misclassified table; predictions.csv has them all

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { margin-top: 1.8em; color: #1f4e79; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef3f8; }
tr.mistake td { background: #fdecea; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
.figures { display: flex; gap: 1em; align-items: flex-start; }
.figures figure { flex: 1; margin: .5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .85em; }
.muted { color: #777; }
"""

# Caption of each figure the evaluation, calibration, comparison and cross-validation code writes.
_CAPTIONS = {
    "confusion_matrix.png": "Confusion matrix: counts and row-normalised (rows true, columns predicted)",
    "roc_curves.png": "ROC curves, one vs rest",
    "pr_curves.png": "Precision-recall curves, one vs rest",
    "reliability_diagram.png": "Reliability diagram (top-label confidence)",
    "training_curves.png": "Training curves",
    "predictions_grid.png": "Sample predictions (mistakes framed in red)",
    "attention_rollout.png": "Attention rollout",
    "gradcam_predicted_class.png": "Grad-CAM of the predicted class",
    "differences.png": "Paired differences with 95% intervals",
    "conformal_set_sizes.png": "Conformal prediction set sizes",
    "stress_heatmap.png": "Balanced accuracy drop per corruption and severity",
    "stress_curves.png": "Balanced accuracy against severity, one curve per corruption",
    "stress_examples.png": "One image under every corruption and severity",
}
_HEADLINE = (("accuracy", "accuracy", "ci95.accuracy"), ("balanced accuracy", "balanced_accuracy", None),
             ("Cohen's κ", "cohen_kappa", "ci95.cohen_kappa"), ("macro F1", "macro.f1", "ci95.f1_macro"),
             ("weighted F1", "weighted.f1", None), ("ROC AUC (macro, one-vs-rest)", "roc_auc.macro",
                                                    "ci95.roc_auc_macro"),
             ("sensitivity", "sensitivity", "ci95.sensitivity"), ("specificity", "specificity", "ci95.specificity"))
_CALIBRATION = (("ECE (15 equal-width bins)", "ece_15"), ("ECE (15 equal-mass bins)", "ece_adaptive_15"),
                ("MCE", "mce"), ("Brier score", "brier"), ("NLL", "nll"), ("images", "num_examples"))
_MISSING = object()


# ---------------------------------------------------------------------------------------------------------- pages


def write_report_html(eval_dir, report: dict, *, config=None, title: str | None = None) -> Path:
    """eval_dir/report.html from report.json's dict, the PNGs and predictions.csv in eval_dir, and the run config."""
    eval_dir = Path(eval_dir)
    values, figures = _Values(report), _Figures(eval_dir)
    title = title or f"{report.get('split', 'evaluation')}: {report.get('num_examples', '?')} images"
    intro = _paragraph(f"checkpoint {report.get('checkpoint', '?')}; classes: "
                       f"{', '.join(map(str, report.get('class_names', [])))}")
    body = [intro, *_classification_sections(values, figures),
            _section("Operating point", _operating_point(values)),
            _section("Out-of-distribution detection", _ood(values)),
            _section("Conformal prediction sets", _conformal(values) + figures.take("conformal_set_sizes.png")),
            _section("Training curves", figures.take("training_curves.png")),
            _section("Misclassified images",
                     _misclassified(eval_dir / "predictions.csv") + figures.take("predictions_grid.png")),
            _section("Explanations", _explanation_checks(values) +
                     figures.take("attention_rollout.png", "gradcam_predicted_class.png")),
            _section("Other figures", figures.rest()),
            _section("Configuration", _json_details("config.json", _plain(config)) if config is not None else "")]
    return _write(eval_dir / "report.html", title, body)


def write_cv_html(cv_dir, summary: dict) -> Path:
    """cv_dir/summary.html: each metric's mean, sd and per-fold values, then the pooled out-of-fold report."""
    cv_dir = Path(cv_dir)
    values, figures = _Values(summary), _Figures(cv_dir)
    folds = summary.get("folds", len(next(iter(summary.get("metrics", {}).values()), {}).get("values", [])))
    intro = _paragraph(f"{folds}-fold cross-validation" + (
        f"; each fold held out {', '.join(map(str, summary['images_per_fold']))} images of train+val"
        if summary.get("images_per_fold") else ""))
    rows = [[_escape(name), values(("metrics", name, "mean")), values(("metrics", name, "sd")),
             *(values(("metrics", name, "values", k)) for k in range(len(row.get("values", []))))]
            for name, row in summary.get("metrics", {}).items()]
    table = _table(["metric", "mean", "sd", *(f"fold {k}" for k in range(folds))], rows) if rows else ""
    pooled = values.child("pooled")
    notes = "".join(_paragraph(f"Note: {note}.") for note in summary.get("notes") or [])
    body = [intro, _section("Per-fold metrics", table + notes)]
    if pooled.tree:
        body.append(f"<h2>Pooled out-of-fold predictions ({pooled('num_examples')} images)</h2>")
        body += _classification_sections(pooled, figures, level=3)
    body.append(_section("Other figures", figures.rest()))
    return _write(cv_dir / "summary.html", f"{folds}-fold cross-validation", body)


def write_comparison_html(out_dir, comparison: dict) -> Path:
    """out_dir/comparison.html: the runs side by side, every pair's paired tests and verdicts, the figures."""
    out_dir = Path(out_dir)
    values, figures = _Values(comparison), _Figures(out_dir)
    runs = comparison.get("runs", [])
    title = (f"{len(runs)} runs compared on {comparison.get('split', '?')}: "
             f"{comparison.get('num_examples', '?')} images")
    rows = []
    metric_names = [key for key in (runs[0].get("metrics", {}) if runs else {}) if key != "recall"]
    for key in metric_names:
        rows.append([_escape(key.replace("_", " ")),
                     *(values.with_interval(("runs", i, "metrics", key)) for i in range(len(runs)))])
    for name in comparison.get("class_names", []):
        rows.append([_escape(f"recall: {name}"),
                     *(values.with_interval(("runs", i, "metrics", "recall", name)) for i in range(len(runs)))])
    if any(run.get("training") for run in runs):
        for key in ("parameters", "train_seconds", "images_per_second"):
            rows.append([_escape(key.replace("_", " ")),
                         *(values(("runs", i, "training", key)) for i in range(len(runs)))])
    if any(run.get("conformal") for run in runs):  # each run's own alpha and method, beside its accuracy
        rows.append(["conformal coverage", *(values.with_interval(("runs", i, "conformal", "coverage"))
                                             for i in range(len(runs)))])
        rows.append(["mean set size", *(values(("runs", i, "conformal", "mean_set_size")) for i in range(len(runs)))])
    runs_table = _table(["", *(run.get("name", f"run {i}") for i, run in enumerate(runs))], rows) if runs else ""
    pairs, verdicts = comparison.get("pairs", []), []
    differences = [key for key, entry in (pairs[0].get("paired_bootstrap", {}) if pairs else {}).items()
                   if isinstance(entry, dict) and "difference" in entry]
    pair_rows = []
    for i, pair in enumerate(pairs):
        cells = [_escape(f"{pair.get('a')} − {pair.get('b')}")]
        cells += [values.with_interval(("pairs", i, "paired_bootstrap", key), "difference") for key in differences]
        cells.append(f"{values(('pairs', i, 'mcnemar', 'pvalue'))} ({values(('pairs', i, 'mcnemar', 'b'))} / "
                     f"{values(('pairs', i, 'mcnemar', 'c'))})")
        cells.append(values(("pairs", i, "delong", "pvalue")))
        deciding = ("pairs", i, "accuracy_test")
        cells.append(f"{_escape(values.get(deciding + ('test',), ''))} "
                     f"{values.with_interval(deciding, 'difference')}, p {values(deciding + ('pvalue',))}"
                     + (f" (Holm {values(deciding + ('adjusted_pvalue',))})"
                        if values.get(deciding + ("adjusted_pvalue",)) is not _MISSING else ""))
        pair_rows.append(cells)
        verdicts += [pair[key] for key in ("verdict", "auc_verdict") if pair.get(key)]
        if pair.get("delong_skipped"):
            verdicts.append(f"{pair.get('a')} vs {pair.get('b')}: no DeLong test ({pair['delong_skipped']})")
    pair_table = _table(["A − B", *(f"{key.replace('_', ' ')} difference (95% CI)" for key in differences),
                         "McNemar p (only A right / only B right)", "DeLong p", "accuracy test (95% CI), p"],
                        pair_rows) if pairs else ""
    body = [_section("Runs (value, 95% CI: Wilson for accuracy and recall, bootstrap for the rest)", runs_table),
            _section("Paired differences", pair_table),
            _section("Verdicts", "<ul>" + "".join(f"<li>{_escape(v)}</li>" for v in verdicts) + "</ul>"
                     if verdicts else ""),
            _section("Figures", figures.take("roc_curves.png", "differences.png") + figures.rest())]
    return _write(out_dir / "comparison.html", title, body)


def write_stress_html(out_dir, records: list[dict], summary: dict) -> Path:
    """out_dir/stress.html: the MedMNIST-C summary, every corruption × severity's numbers, the figures."""
    out_dir = Path(out_dir)
    values, figures = _Values({"records": records, "summary": summary}), _Figures(out_dir)
    title = f"Stress test: {summary.get('split')}, {summary.get('checkpoint')} ({summary.get('images')} images)"
    intro = _paragraph(f"Artefacts applied to the {summary.get('applied_to')}; {summary.get('temperature_note')}. "
                       "BE = 1 − balanced accuracy; rBE = BE − BE clean, averaged over severities (MedMNIST-C's rBE "
                       "before its division by a reference model's).")
    headline = _table(["", "value"], [[_escape(label), values(("summary", key))] for label, key in
                                      (("BE clean", "BE_clean"), ("mBE", "mBE"), ("mrBE", "mrBE"))])
    per = _table(["corruption", "BE", "rBE"], [[_escape(name), values(("summary", "corruptions", name, "BE")),
                                                values(("summary", "corruptions", name, "rBE"))]
                                               for name in summary.get("corruptions", {})])
    rows = []
    for i, record in enumerate(records):
        cells = [_escape(record["corruption"]), values(("records", i, "severity"))]
        keys = ("accuracy", "balanced_accuracy", "macro_auc", "ece_15") + (
            ("conformal_coverage", "mean_set_size") if "conformal_coverage" in records[0] else ()) + (
            ("ood_flag_rate",) if "ood_flag_rate" in records[0] else ())
        cells += ([_escape(f"failed: {record['error']}")] + [""] * (len(keys) - 1) if "error" in record else
                  [values(("records", i, key)) for key in keys])
        rows.append(cells)
    table = _table(["corruption", "severity", "accuracy", "balanced accuracy", "macro AUC", "ECE",
                    *(("conformal coverage", "mean set size") if "conformal_coverage" in records[0] else ()),
                    *(("OOD flagged",) if "ood_flag_rate" in records[0] else ())], rows)
    body = [intro, _section("Summary", headline + per), _section("Figures", figures.take(
        "stress_heatmap.png", "stress_curves.png") + figures.take("stress_examples.png")),
        _section("Every corruption and severity", table)]
    return _write(out_dir / "stress.html", title, body)


def _explanation_checks(values: _Values) -> str:
    methods = values.get(("explanations", "methods"), None)
    if not methods:
        return ""
    rows, verdicts = [], []
    for name in methods:
        base = ("explanations", "methods", name)
        rows.append([_escape(name.replace("_", " ")),
                     f"{values(base + ('deletion', 'auc'))} vs {values(base + ('deletion', 'random_auc'))}",
                     f"{values(base + ('insertion', 'auc'))} vs {values(base + ('insertion', 'random_auc'))}",
                     values(base + ("randomisation", "stages",
                                    len(values.get(base + ("randomisation", "stages"), [])) - 1, "spearman")),
                     (f"{values(base + ('localisation', 'pointing_game'))} (chance "
                      f"{values(base + ('localisation', 'pointing_chance'))})"
                      if values.get(base + ("localisation", "pointing_game"), None) is not None else "n/a")])
        verdicts.append(values.get(base + ("verdict",), ""))
    return (_table(["method", "deletion AUC (lower better) vs random", "insertion AUC (higher better) vs random",
                    "Spearman ρ, all weights re-initialised", "pointing game"], rows)
            + "".join(_paragraph(v) for v in verdicts if v))


# ---------------------------------------------------------------------------------------------------------- sections


def _classification_sections(values: _Values, figures: _Figures, level: int = 2) -> list[str]:
    """What a report.json-like dict holds, shared by an evaluation and the pooled cross-validation predictions."""
    return [_section("Headline metrics", _headline(values), level),
            _section("Per class", _per_class(values), level),
            _section("Confusion matrix", _confusion(values) + figures.take("confusion_matrix.png"), level),
            _section("ROC and precision-recall curves", figures.take("roc_curves.png", "pr_curves.png"), level),
            _section("Calibration", _calibration(values) + figures.take("reliability_diagram.png"), level)]


def _headline(values: _Values) -> str:
    rows = [[_escape(label), values(path), values.interval(ci) if ci else ""]
            for label, path, ci in _HEADLINE if values.get(path) is not _MISSING]
    if not rows:
        return ""
    notes = "".join(_paragraph(f"Note: {note}.") for note in values.get("notes", None) or [])
    return _table(["metric", "value", "95% CI"], rows) + notes + _interval_methods(values.get("ci95_methods", None))


def _interval_methods(methods) -> str:
    """Which method made each 95% interval and which unit (image or patient) it resampled."""
    if not isinstance(methods, dict) or not methods:
        return ""
    rows = [[_escape(key), _escape(made.get("method")), _escape(made.get("unit") or ""),
             _escape(made.get("note") or "")]
            for key, made in methods.items() if isinstance(made, dict)]
    return _table(["95% interval of", "method", "unit", "note"], rows)


def _per_class(values: _Values) -> str:
    rows = []
    for name in values.get("per_class", {}) or {}:
        rows.append([_escape(name), values(("per_class", name, "precision")),
                     values.interval(("ci95", "precision", name)), values(("per_class", name, "recall")),
                     values.interval(("ci95", "recall", name)), values(("per_class", name, "f1")),
                     values(("roc_auc", "per_class", name)), values(("per_class", name, "support"))])
    for average in ("macro", "weighted"):
        if values.get(average) is not _MISSING:
            rows.append([f"<em>{average}</em>", values((average, "precision")), "", values((average, "recall")), "",
                         values((average, "f1")), "", ""])
    return _table(["class", "precision", "precision 95% CI", "recall", "recall 95% CI", "F1", "ROC AUC", "support"],
                  rows) if rows else ""


def _confusion(values: _Values) -> str:
    matrix, names = values.get("confusion_matrix"), values.get("class_names")
    if not isinstance(matrix, list) or not isinstance(names, list):
        return ""
    rows = [[_escape(names[i]), *(values(("confusion_matrix", i, j)) for j in range(len(row)))]
            for i, row in enumerate(matrix)]
    return _paragraph("rows: true class, columns: predicted class") + _table(["true \\ predicted", *names], rows)


def _calibration(values: _Values) -> str:
    calibration = values.child("calibration")
    if not isinstance(calibration.tree, dict):
        return ""
    # An evaluation has before/after temperature scaling; the pooled cross-validation predictions one set.
    columns = [key for key in ("before", "after") if isinstance(calibration.get(key), dict)] or [None]
    brier = calibration.get((columns[-1], "brier_kind") if columns[-1] else ("brier_kind",), "Brier score")
    rows = [[_escape(brier if key == "brier" else label),
             *(calibration((column, key) if column else (key,)) for column in columns)] for label, key in _CALIBRATION]
    text = ""
    if calibration.get("temperature") is not _MISSING:
        fitted, reason = calibration.get("fitted_on"), calibration.get("not_applied_reason", None)
        text = _paragraph(f"Temperature T = {calibration('temperature')}, " + (
            f"fitted on {_escape(fitted)}" if fitted not in (None, _MISSING) else
            f"not applied: {_escape(reason)}" if reason else "not fitted (no validation split)"), escaped=True)
    return text + _table(["metric", *(column or "value" for column in columns)], rows)


def _operating_point(values: _Values) -> str:
    point = values.child("operating_point")
    if not isinstance(point.tree, dict):
        return ""
    text = _paragraph(f"Threshold {point('threshold')} on P({_escape(point.get('positive_class'))}), chosen on "
                      f"{_escape(point.get('chosen_on'))} for recall ≥ {point('target_recall')}", escaped=True)
    def rate(split, key):
        interval = point.interval((split, "ci95", key))
        return point((split, key)) + (f" ({interval})" if interval else "")

    rows = [[_escape(split), rate(split, "sensitivity"), rate(split, "specificity"),
             rate(split, "precision"), f"{point((split, 'flagged'))} of {point((split, 'num_examples'))}"]
            for split, row in point.tree.items() if isinstance(row, dict) and "sensitivity" in row]
    return text + _table(["split", "sensitivity", "specificity", "precision", "flagged"], rows)


def _ood(values: _Values) -> str:
    section = values.child("ood")
    if not isinstance(section.tree, dict):
        return ""
    if "skipped" in section.tree:
        return _paragraph(section.tree["skipped"])
    text = _paragraph(f"Method {_escape(section.get('method'))} ({_escape(section.get('method_chosen_by'))}); "
                      f"threshold {section('threshold')}, set so {section('keep')} of val counts as in distribution. "
                      f"Flagged on this split: {section('flag_rate.flagged')} of {section('flag_rate.num_examples')} "
                      f"({section('flag_rate.rate')}, 95% Wilson CI {section.interval('flag_rate.ci95')}).",
                      escaped=True)
    check = section.child("self_check")
    rows = [[_escape(name), section(("flag_rate_per_detector", name, "rate")), check(("auroc", name))]
            for name in (check.get("auroc") or {})]
    return (text + _table(["detector", "flag rate here", "self-check AUROC"], rows)
            + _paragraph(f"Self-check: {check.get('what')}"))


def _conformal(values: _Values) -> str:
    section = values.child("conformal")
    if not isinstance(section.tree, dict):
        return ""
    if "skipped" in section.tree:
        return _paragraph(f"Not fitted: {section.tree['skipped']}")
    kind = "class-conditional (Mondrian)" if section.tree.get("mondrian") else "marginal"
    text = _paragraph(f"{_escape(str(section.get('method')).upper())}, {kind}, α = {section('alpha')}, calibrated on "
                      f"{_escape(section.get('calibration_split'))} ({section('calibration_images')} images). "
                      f"{_escape(section.get('guarantee'))}", escaped=True)
    rows = [["coverage", section.with_interval("coverage")], ["mean set size", section("mean_set_size")],
            ["singleton rate", section("singleton_rate")], ["empty rate", section("empty_rate")]]
    per_class = [[_escape(name), section.with_interval(("coverage_per_class", name)),
                  section(("coverage_per_class", name, "count"))]
                 for name in section.get("coverage_per_class", {}) or {}]
    return (text + _table(["metric", "value (95% Wilson CI)"], rows)
            + _table(["class", "coverage (95% Wilson CI)", "images"], per_class))


def _misclassified(predictions_csv: Path) -> str:
    """The first MISCLASSIFIED_ROWS rows of predictions.csv whose prediction is wrong, with every probability."""
    if not predictions_csv.exists():
        return ""
    with predictions_csv.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return ""
    header, rows = rows[0], rows[1:]
    wrong = [row for row in rows if len(row) >= 3 and row[1] != row[2]]
    shown_columns = [position for position in range(3, len(header)) if header[position].startswith("p_")]
    probability_columns = [header[position] for position in shown_columns]
    cells = [[_escape(row[0]), _escape(row[1]), _escape(row[2]), *(_format_text(row[position]) for position in
                                                                   shown_columns)]
             for row in wrong[:MISCLASSIFIED_ROWS]]
    shown = f"the first {len(cells)}" if len(wrong) > len(cells) else "all"
    text = _paragraph(f"{len(wrong)} of {len(rows)} images misclassified; {shown} listed (predictions.csv has every "
                      "image).")
    headers = ["id", "true", "predicted", *(f"P({column.removeprefix('p_')})" if column.startswith("p_") else column
                                            for column in probability_columns)]  # then prediction_set, …
    return text + (_table(headers, cells, row_class="mistake") if cells else "")


# ---------------------------------------------------------------------------------------------------------- blocks


class _Values:
    """Numbers of one JSON tree as HTML, each tagged with its dotted path from the page's root dict."""

    def __init__(self, tree, prefix: tuple = ()):
        self.tree, self.prefix = tree, prefix

    def get(self, path, default=_MISSING):
        node = self.tree
        for key in _path(path):
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
                node = node[key]
            else:
                return default
        return node

    def child(self, path) -> _Values:
        return _Values(self.get(path, None), self.prefix + _path(path))

    def __call__(self, path) -> str:
        value = self.get(path)
        if value is _MISSING:
            return '<span class="muted">n/a</span>'
        key = ".".join(map(str, self.prefix + _path(path)))
        return f'<span data-key="{html.escape(key)}">{_format(value)}</span>'

    def interval(self, path) -> str:
        """A [low, high] list as 'low–high'; empty when the interval is absent or undefined (None)."""
        low_high = self.get(path, None)
        if not isinstance(low_high, list) or len(low_high) != 2:
            return ""
        return f"{self(_path(path) + (0,))}–{self(_path(path) + (1,))}"

    def with_interval(self, path, value_key: str = "value") -> str:
        """{"value" (or `value_key`), "ci95"} as 'value (low–high)'."""
        interval = self.interval(_path(path) + ("ci95",))
        return self(_path(path) + (value_key,)) + (f" ({interval})" if interval else "")


class _Figures:
    """The PNGs of one directory, each embedded once: named ones where they belong, the rest at the end."""

    def __init__(self, directory: Path):
        self.directory, self.used = directory, set()

    def take(self, *names: str) -> str:
        parts = []
        for name in names:
            path = self.directory / name
            if path.is_file() and name not in self.used:
                self.used.add(name)
                encoded = base64.b64encode(path.read_bytes()).decode("ascii")
                caption = _CAPTIONS.get(name, name)
                parts.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{_escape(caption)}">'
                             f"<figcaption>{_escape(caption)} ({_escape(name)})</figcaption></figure>")
        # Figures asked for together (ROC beside PR, rollout beside Grad-CAM) share the page's width.
        return f'<div class="figures">{"".join(parts)}</div>' if len(parts) > 1 else "".join(parts)

    def rest(self) -> str:
        return self.take(*sorted(path.name for path in self.directory.glob("*.png")))


def _write(path: Path, title: str, body: list[str]) -> Path:
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{_escape(title)}</h1>\n"
            + "\n".join(part for part in body if part) + "\n</body>\n</html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _section(title: str, content: str, level: int = 2) -> str:
    return f"<section><h{level}>{_escape(title)}</h{level}>\n{content}</section>" if content else ""


def _table(headers, rows, row_class: str | None = None) -> str:
    """Headers are plain text (escaped here); cells are HTML already."""
    head = "".join(f"<th>{_escape(header)}</th>" for header in headers)
    attribute = f' class="{row_class}"' if row_class else ""
    body = "".join(f"<tr{attribute}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def _paragraph(text: str, escaped: bool = False) -> str:
    return f"<p>{text if escaped else _escape(text)}</p>\n"


def _json_details(name: str, tree) -> str:
    text = json.dumps(tree, indent=2, sort_keys=True, default=str)
    return f"<details open><summary>{_escape(name)}</summary><pre>{_escape(text)}</pre></details>\n"


def _plain(config):
    """A ConfigDict (or anything with to_dict) as plain JSON values; dicts and JSON text pass through."""
    if isinstance(config, str):
        return json.loads(config)
    return config.to_dict() if hasattr(config, "to_dict") else config


def _format(value) -> str:
    """As report.md: floats to 4 decimals, counts as integers, undefined (None) as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return _escape(value)


def _format_text(text: str) -> str:
    """A number read from a CSV cell, as _format prints it; anything else escaped as it is."""
    try:
        return _format(float(text))
    except ValueError:
        return _escape(text)


def _path(path) -> tuple:
    return tuple(path.split(".")) if isinstance(path, str) else tuple(path)


def _escape(value) -> str:
    return html.escape(str(value))
