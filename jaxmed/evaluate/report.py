"""A checkpoint on a split → W/eval/<split>/: report.json, report.md, predictions.csv and figures.

    python -m jaxmed.evaluate --workdir W [--split test|val] [--checkpoint best|latest|STEP]

Also run at the end of training. Metrics come with bootstrap confidence intervals, and — when `eval.positive_class`
is set — an operating point: the threshold chosen on val to reach `eval.target_recall` for that class, then
applied to the evaluated split (the clinical question "at what threshold do we miss almost no pneumonia?").
Every evaluation also fits the out-of-distribution detectors (ood.py) on the checkpoint it evaluates.
"""

from __future__ import annotations

import json
import logging
import sys

import jax
import numpy as np

from jaxmed import train
from jaxmed.config import load_run_config
from jaxmed.evaluate import calibration, conformal, figures, html, intervals, metrics, ood
from jaxmed.errors import JaxmedError
from jaxmed.evaluate.predictions_csv import (groups_for, read_predictions, read_predictions_with_logits,  # noqa: F401
                                             write_predictions)

log = logging.getLogger("jaxmed.evaluate")


def evaluate_run(run, checkpoints, eval_step, split_name: str, which: str = "best", data_overrides=None) -> dict:
    """Predict `split_name` with a checkpoint (the best by validation unless told) and write everything.
    `data_overrides`: the data keys changed since training (e.g. the data moved), recorded in report.json."""
    if split_name not in run.dataset.splits:
        others = [name for name in run.dataset.splits if name != "train"]
        raise JaxmedError(f"no {split_name!r} split in this dataset; it has {', '.join(run.dataset.splits)}"
                          + (f": use --split {others[0]}" if others else ""))
    flat, _, source = checkpoints.restore_flat_weights(which)
    params, stats = train.place_weights(run, flat)
    names, ec = run.dataset.class_names, run.config.eval

    predicted = {}

    def logits_of(split):  # each split predicted once, whoever asks first
        if split.name not in predicted:
            predicted[split.name] = train.predict(run, eval_step, params, stats, split)
        return predicted[split.name]

    temperature, fitted_on, kept_reason = 1.0, None, None
    if ec.calibrate and "val" in run.dataset.splits:
        val_indices, val_logits = logits_of(run.dataset.splits["val"])
        chosen = calibration.choose_temperature(val_logits, run.dataset.splits["val"].labels[val_indices])
        temperature, kept_reason = chosen["temperature"], chosen["reason"]
        fitted_on = "val" if chosen["applied"] else None
        if kept_reason:
            log.warning("temperature scaling not applied (T = 1): %s", kept_reason)

    def probabilities(split):
        indices, logits = logits_of(split)
        return indices, calibration.apply_temperature(logits, temperature)

    split = run.dataset.splits[split_name]
    indices, probs = probabilities(split)
    labels = split.labels[indices]
    groups = _groups_of(split, indices)
    if ec.proportion_interval not in intervals.PROPORTION_METHODS:
        raise JaxmedError(f"eval.proportion_interval={ec.proportion_interval!r}: choose "
                          f"{' or '.join(intervals.PROPORTION_METHODS)}")
    report = metrics.classification_metrics(labels, probs, names, bootstrap=ec.bootstrap, seed=ec.seed,
                                            groups=groups, proportion_method=ec.proportion_interval)
    report.update(split=split_name, checkpoint=source)
    if data_overrides:
        report["data_overrides"] = dict(data_overrides)
    uncalibrated = calibration.apply_temperature(logits_of(split)[1], 1.0)
    report["calibration"] = {"temperature": temperature, "fitted_on": fitted_on, "applied": bool(fitted_on),
                             "not_applied_reason": kept_reason,
                             "before": calibration.calibration_metrics(labels, uncalibrated),
                             "after": calibration.calibration_metrics(labels, probs)}
    if ec.positive_class:
        report["operating_point"] = _operating_point(run, probabilities, labels, probs, split_name, groups)
    report["ood"], fitted_ood, ood_columns = ood.fit_on_run(run, params, stats, flat, split_name, source)
    report["conformal"], conformal_fit, sets = _conformal(run, probabilities, split, indices, labels, probs)
    if jax.process_index() == 0:
        out = run.workdir / "eval" / split_name
        checks = _explanations(run, out, split, indices, labels, flat)
        if checks:
            report["explanations"] = checks
        write_report(out, report)
        write_predictions(out / "predictions.csv", [split.ids[i] for i in indices], labels, probs, names,
                          logits=logits_of(split)[1],
                          prediction_sets=None if sets is None else conformal.set_labels(sets, names),
                          extra_columns=_ood_columns(ood_columns, len(indices)))
        if which == "best":  # what predict applies belongs to the model it uses by default
            _store_with_run(run.workdir, report, source)
            _store_conformal(run.workdir, conformal_fit, source, temperature)
            _store_ood_with_run(run.workdir, fitted_ood)
        if sets is not None:
            conformal.set_size_histogram(report["conformal"]["set_size_counts"], out / "conformal_set_sizes.png")
        _figures(run, out, split, indices, labels, probs, report["confusion_matrix"])
        calibration.reliability_diagram(labels, uncalibrated, out / "reliability_diagram.png",
                                        probabilities_after=probs if fitted_on else None)
        html.write_report_html(out, report, config=json.loads(run.config.to_json_best_effort()))
        log.info("%s: accuracy %.4f, ECE %.4f → %.4f at T = %.3f (%s) → %s", split_name, report["accuracy"],
                 report["calibration"]["before"]["ece_15"], report["calibration"]["after"]["ece_15"], temperature,
                 source, out)
    return report


def _store_with_run(workdir, report: dict, source: str) -> None:
    """W/calibration.json and W/operating_point.json: what `jaxmed.predict` applies to new images."""
    point = report["calibration"]
    (workdir / "calibration.json").write_text(json.dumps(
        {"temperature": point["temperature"], "fitted_on": point["fitted_on"],
         "not_applied_reason": point.get("not_applied_reason"), "checkpoint": source}, indent=1) + "\n")
    if "operating_point" in report:
        chosen = report["operating_point"]
        (workdir / "operating_point.json").write_text(json.dumps(
            {key: chosen[key] for key in ("positive_class", "threshold", "target_recall", "chosen_on")}
            | {"checkpoint": source, "temperature": point["temperature"]}, indent=1) + "\n")


def _store_ood_with_run(workdir, fitted) -> None:
    """W/ood/: the detectors and thresholds `jaxmed.predict` applies; a run without val gets none (old ones go)."""
    if fitted is None:
        ood.remove(workdir / "ood")
    else:
        ood.save(workdir / "ood", fitted)


def _ood_columns(columns: dict, count: int) -> dict:
    """predictions.csv's ood_score and out_of_distribution (true/false); empty cells where nothing was fitted."""
    if not columns:
        return {"ood_score": [""] * count, "out_of_distribution": [""] * count}
    return {"ood_score": [f"{score:.9g}" for score in columns["ood_score"]],
            "out_of_distribution": ["true" if flag else "false" for flag in columns["out_of_distribution"]]}


def _conformal(run, probabilities, split, indices, labels, probs) -> tuple[dict, dict | None, np.ndarray | None]:
    """Prediction sets fitted on the calibration split (else val, approximately) and measured on `split`."""
    ec, splits = run.config.eval, run.dataset.splits
    if ec.conformal_method not in conformal.METHODS:
        raise JaxmedError(f"eval.conformal_method={ec.conformal_method!r} is not one of {', '.join(conformal.METHODS)}")
    if not 0 < ec.conformal_alpha < 1:
        raise JaxmedError(f"eval.conformal_alpha={ec.conformal_alpha} must be in (0, 1), e.g. 0.05 for 95% sets")
    held_out = next((name for name in ("calibration", "val") if name in splits), None)
    if held_out is None:
        return {"skipped": "no calibration or val split: set data.calibration_fraction > 0"}, None, None
    calibration_indices, calibration_probs = probabilities(splits[held_out])
    return conformal.evaluate(
        (calibration_probs, splits[held_out].labels[calibration_indices], splits[held_out].images, calibration_indices),
        (probs, labels, split.images, indices), run.dataset.class_names, method=ec.conformal_method,
        alpha=ec.conformal_alpha, mondrian=ec.conformal_mondrian, seed=ec.seed, calibration_split=held_out,
        evaluated_split=split.name)


def _store_conformal(workdir, fitted: dict | None, source: str, temperature: float) -> None:
    """W/conformal.json: the thresholds `jaxmed.predict` applies, for this checkpoint's calibrated probabilities."""
    if fitted is not None:
        (workdir / "conformal.json").write_text(json.dumps(
            fitted | {"checkpoint": source, "temperature": temperature}, indent=1) + "\n")


def _operating_point(run, probabilities, labels, probs, split_name: str, groups=None) -> dict:
    names, ec = run.dataset.class_names, run.config.eval
    if ec.positive_class not in names:
        raise JaxmedError(f"eval.positive_class={ec.positive_class!r} is not a class; the classes are {names}")
    positive = names.index(ec.positive_class)
    val = run.dataset.splits.get("val")
    if val is None:
        raise JaxmedError("an operating point is chosen on val, and this dataset has no val split; set "
                          "data.val_fraction > 0 or leave eval.positive_class empty")
    val_indices, val_probs = probabilities(val)
    threshold = metrics.operating_point(val.labels[val_indices], val_probs, positive, ec.target_recall)
    return {"positive_class": ec.positive_class, "target_recall": ec.target_recall, "chosen_on": "val",
            "threshold": threshold,
            "val": metrics.apply_operating_point(val.labels[val_indices], val_probs, positive, threshold, names,
                                                 groups=_groups_of(val, val_indices)),
            split_name: metrics.apply_operating_point(labels, probs, positive, threshold, names, groups=groups)}


def _groups_of(split, indices):
    """The patient id of each predicted image (data.group_pattern), or None: then the image is the unit."""
    if not split.groups:
        return None
    return np.asarray(split.groups, dtype=object)[np.asarray(indices)]


def write_report(out, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """report.json for people: the headline numbers with their 95% intervals, per class, the operating point."""
    ci = report.get("ci95") or {}

    def interval(values):
        return f" (95% CI {values[0]:.4f}–{values[1]:.4f})" if values else ""

    auc = report["roc_auc"]
    lines = [f"# {report.get('split', 'evaluation')}: {report['num_examples']} images, checkpoint "
             f"{report.get('checkpoint', '?')}", "",
             f"- accuracy: {report['accuracy']:.4f}{interval(ci.get('accuracy'))}",
             f"- balanced accuracy: {report['balanced_accuracy']:.4f}",
             f"- Cohen's κ: {format_number(report['cohen_kappa'])}{interval(ci.get('cohen_kappa'))}",
             f"- macro F1: {report['macro']['f1']:.4f}{interval(ci.get('f1_macro'))}",
             f"- ROC AUC (macro, one-vs-rest): {format_number(auc['macro'])}{interval(ci.get('roc_auc_macro'))}"]
    if "sensitivity" in report:
        lines.append(f"- sensitivity {format_number(report['sensitivity'])}{interval(ci.get('sensitivity'))}, "
                     f"specificity {format_number(report['specificity'])}{interval(ci.get('specificity'))} "
                     f"(positive: {report['class_names'][1]})")
    lines += ["", "| class | precision (95% CI) | recall (95% CI) | F1 | ROC AUC | support |",
              "|---|---|---|---|---|---|"]
    recall_ci, precision_ci = ci.get("recall") or {}, ci.get("precision") or {}
    for name, row in report["per_class"].items():
        lines.append(f"| {name} | {format_number(row['precision'])}{interval(precision_ci.get(name))} | "
                     f"{format_number(row['recall'])}{interval(recall_ci.get(name))} | {format_number(row['f1'])} | "
                     f"{format_number(auc['per_class'].get(name))} | {row['support']} |")
    for average in ("macro", "weighted"):
        row = report[average]
        lines.append(f"| *{average}* | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | | |")
    lines += [f"\nNote: {note}." for note in report.get("notes") or []]
    lines += interval_methods_lines(report.get("ci95_methods"))
    point = report.get("operating_point")
    if point:
        lines += ["", f"## Operating point for {point['positive_class']}", "",
                  f"Threshold {point['threshold']:.4f} on P({point['positive_class']}), chosen on val for recall ≥ "
                  f"{point['target_recall']}:", "", "| split | sensitivity | specificity | precision | flagged |",
                  "|---|---|---|---|---|"]
        for split in ("val", report.get("split")):
            row = point[split]
            rates = [f"{format_number(row[key])}{interval((row.get('ci95') or {}).get(key))}"
                     for key in ("sensitivity", "specificity", "precision")]
            lines.append(f"| {split} | " + " | ".join(rates) + f" | {row['flagged']} of {row['num_examples']} |")
        method = point.get(report.get("split"), {}).get("ci95_method")
        if method:
            lines += ["", f"Intervals: {method['method']} (unit: {method['unit']})."]
    calibrated = report.get("calibration")
    if calibrated:
        if calibrated["applied"]:
            scaled = (f"temperature T = {calibrated['temperature']:.4f} fitted on {calibrated['fitted_on']} "
                      "(probabilities above are scaled)")
        elif calibrated.get("not_applied_reason"):
            scaled = f"no temperature scaling (T = 1), because {calibrated['not_applied_reason']}"
        else:
            scaled = "no temperature scaling (T = 1)"
        brier = calibrated["after"].get("brier_kind", "Brier")
        lines += ["", f"## Calibration: {scaled}", "", f"| | ECE (15 bins) | ECE (adaptive) | MCE | {brier} | NLL |",
                  "|---|---|---|---|---|---|"]
        for when in ("before", "after"):
            row = calibrated[when]
            lines.append(f"| {when} | {row['ece_15']:.4f} | {row['ece_adaptive_15']:.4f} | {row['mce']:.4f} | "
                         f"{row['brier']:.4f} | {row['nll']:.4f} |")
    lines += _ood_markdown(report.get("ood"))
    lines += _conformal_markdown(report.get("conformal"))
    lines += ["", "Confusion matrix (rows true, columns predicted): see confusion_matrix.png; every prediction is in "
              "predictions.csv.", ""]
    return "\n".join(lines)


def _ood_markdown(section) -> list[str]:
    if not section:
        return []
    if "skipped" in section:
        return ["", f"## Out-of-distribution detection: {section['skipped']}"]
    rate = section["flag_rate"]
    lines = ["", f"## Out-of-distribution detection: {section['method']} ({section['method_chosen_by']})", "",
             f"Threshold {section['threshold']:.6g}: {section['keep']:.0%} of val kept as in distribution. Flagged "
             f"on this split: {rate['flagged']} of {rate['num_examples']} ({rate['rate']:.4f}, 95% Wilson CI "
             f"{rate['ci95'][0]:.4f}–{rate['ci95'][1]:.4f}).", "",
             f"Self-check: {section['self_check']['what']}", "",
             "| detector | flagged here | self-check AUROC |", "|---|---|---|"]
    for name, auroc in section["self_check"]["auroc"].items():
        lines.append(f"| {name} | {section['flag_rate_per_detector'][name]['rate']:.4f} | {auroc:.4f} |")
    return lines


def _conformal_markdown(section: dict | None) -> list[str]:
    if not section or "skipped" in section:
        return ["", f"## Conformal prediction sets: not fitted ({section['skipped']})"] if section else []

    def rate(row):
        low_high = f" (95% CI {row['ci95'][0]:.4f}–{row['ci95'][1]:.4f})" if row["ci95"] else ""
        return f"{format_number(row['value'])}{low_high}"

    kind = "class-conditional (Mondrian)" if section["mondrian"] else "marginal"
    lines = ["", f"## Conformal prediction sets: {section['method'].upper()}, {kind}, alpha = {section['alpha']:g}, "
             f"calibrated on {section['calibration_split']} ({section['calibration_images']} images)", "",
             section["guarantee"], "", f"- coverage: {rate(section['coverage'])}",
             f"- mean set size: {format_number(section['mean_set_size'])}; singletons "
             f"{format_number(section['singleton_rate'])}, empty {format_number(section['empty_rate'])}", "",
             "| class | coverage (95% Wilson CI) | images |", "|---|---|---|"]
    lines += [f"| {name} | {rate(row)} | {row['count']} |" for name, row in section["coverage_per_class"].items()]
    return lines


def interval_methods_lines(methods: dict | None) -> list[str]:
    """'How each 95% interval was made' as markdown lines: one per distinct method, with the unit resampled."""
    if not methods:
        return []
    by_method = {}
    for key, made in methods.items():
        unit = f"; unit: {made['unit']}" if made.get("unit") else ""
        note = f"; {made['note']}" if made.get("note") else ""
        by_method.setdefault(f"{made['method']}{unit}{note}", []).append(key)
    return ["", "95% intervals:"] + [f"- {', '.join(keys)}: {method}" for method, keys in by_method.items()]


def format_number(value) -> str:
    """A metric for tables: 4 decimals, or n/a where it is undefined (None)."""
    return "n/a" if value is None else f"{value:.4f}"


def _figures(run, out, split, indices, labels, probs, confusion) -> None:
    names = run.dataset.class_names
    predictions = probs.argmax(-1)
    figures.confusion_matrix(np.asarray(confusion), names, out / "confusion_matrix.png")
    figures.roc_curves(labels, probs, names, out / "roc_curves.png")
    figures.pr_curves(labels, probs, names, out / "pr_curves.png")
    if (run.workdir / "metrics.jsonl").exists():
        figures.training_curves(run.workdir / "metrics.jsonl", out / "training_curves.png")
    shown = _grid_sample(labels, predictions, run.config.eval.grid_images)
    figures.predictions_grid(split.images[indices[shown]], labels[shown], predictions[shown], probs[shown], names,
                             out / "predictions_grid.png", max_images=len(shown))


def _grid_sample(labels, predictions, count: int) -> np.ndarray:
    """Up to half mistakes, the rest correct, spread over the classes; deterministic."""
    wrong, right = np.flatnonzero(labels != predictions), np.flatnonzero(labels == predictions)
    take_wrong = wrong[:count // 2]
    by_class = [right[labels[right] == c] for c in np.unique(labels[right])] if len(right) else []
    take_right = [group[i] for i in range(count) for group in by_class if i < len(group)][:count - len(take_wrong)]
    return np.sort(np.concatenate([take_wrong, np.asarray(take_right, int)]).astype(int))


def _explanations(run, out, split, indices, labels, flat: dict) -> dict | None:
    """Attention rollout (ViT, CvT) and Grad-CAM (ResNet, EfficientNet, CvT, ViT) for a few images per class, and
    the checks of those explanations (eval/<split>/explanations.json; → its summary for the report).

    Runs on this host alone (process 0 writes the figures): a model from the checkpoint's host copy of the weights,
    so no collective is needed that the other hosts would have to join.
    """
    from flax import nnx

    from jaxmed import data as jdata
    from jaxmed.evaluate import explain
    from jaxmed.train import optim

    per_class = run.config.eval.explain_per_class
    if per_class and run.spec.hf_config.model_type not in explain.EXPLAINED:
        log.info("no explanation method for a %s model (Grad-CAM and rollout need %s): no heatmaps and no "
                 "explanation checks", run.spec.hf_config.model_type, ", ".join(explain.EXPLAINED))
    if not per_class or run.spec.hf_config.model_type not in explain.EXPLAINED:
        return None

    def local(name):
        return jax.tree_util.tree_map_with_path(lambda path, _: jax.numpy.asarray(flat[optim.dotted(path)]),
                                                run.abstract[name])

    rest = jax.tree.map(lambda x: x.addressable_data(0), run.rest)  # replicated: any local copy
    model = nnx.merge(run.graph_eval, local("params"), local("stats"), rest)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(run.dataset.class_names))])
    images = np.asarray(split.images[indices[chosen]])
    out.mkdir(parents=True, exist_ok=True)
    explain.explanation_figures(model, images, jdata.model_inputs(images, run.preprocessor), labels[chosen],
                                run.dataset.class_names, out, per_class=per_class)
    return _explanation_checks(run, out, split, indices, labels, model)


def _explanation_checks(run, out, split, indices, labels, model) -> dict | None:
    """Deletion/insertion against random maps, model randomisation, and localisation where masks exist, on a seeded
    class-stratified sample of `eval.explain_check_images` images."""
    from jaxmed.data import masks as jmasks
    from jaxmed.evaluate import explain, explain_checks

    ec = run.config.eval
    if ec.explain_check_images <= 0:
        return None
    rng = np.random.default_rng(ec.seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(run.dataset.class_names))]
    chosen = np.sort(np.asarray([group[i] for i in range(len(labels)) for group in by_class if i < len(group)][
        :ec.explain_check_images], int))
    images = np.asarray(split.images[indices[chosen]])
    lesions = jmasks.lesion_masks(run.config.data, [split.ids[i] for i in indices[chosen]], run.preprocessor,
                                  images.shape[1:3])
    maps_of = {"grad_cam": explain.grad_cam}
    if run.spec.hf_config.model_type in ("vit", "cvt"):
        maps_of["attention_rollout"] = explain.attention_rollout
    result = explain_checks.check(model, images, run.preprocessor.normalize, labels[chosen], lesions,
                                  run.dataset.class_names, maps_of=maps_of, seed=ec.seed, bootstrap=ec.bootstrap)
    (out / "explanations.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, entry in result["methods"].items():
        log.info("explanation check, %s: %s", name, entry["verdict"])
    return result


def evaluate_workdir(workdir, split: str = "test", which: str = "best", data_overrides=None) -> dict:
    """The CLI's work: rebuild the run from W/config.json (with `data_overrides`: where the data lives now), then
    `evaluate_run`."""
    from jaxmed.train.checkpoint import Checkpoints, workdir_path
    from jaxmed.workdirs import check_trained

    workdir = workdir_path(workdir)
    config = load_run_config(workdir)  # "no config.json …: is this a jaxmed run directory?"
    check_trained(workdir)
    config.data.update(data_overrides or {})
    run = train.setup(config, workdir)
    checkpoints = Checkpoints.for_run(workdir, config.train)
    try:
        return evaluate_run(run, checkpoints, train.make_eval_step(run), split, which, data_overrides)
    finally:
        checkpoints.close()


def main(argv=None) -> int:
    import argparse

    from jaxmed.cli import OneLineParser, check_read_by_source, data_overrides

    parser = OneLineParser(prog="python -m jaxmed.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog="--config.data.KEY=VALUE: a data key that differs now, e.g. "
                                     "--config.data.root=PATH after the data moved (recorded in report.json)")
    parser.add_argument("--workdir", required=True, help="the run directory given to jaxmed.main")
    parser.add_argument("--split", default="test", help="test (default) or val")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step number")
    from jaxmed.distributed import maybe_initialize_distributed, setup_logging

    try:
        args, extra = parser.parse_known_args(argv)
        setup_logging()
        from jaxmed.train.checkpoint import workdir_path

        stored = load_run_config(workdir_path(args.workdir)).data if extra else None
        overrides = data_overrides(extra, stored) if extra else {}
        check_read_by_source(overrides, stored)
        maybe_initialize_distributed()
        report = evaluate_workdir(args.workdir, args.split, args.checkpoint, overrides)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("split", "checkpoint", "accuracy", "balanced_accuracy")}), flush=True)
    return 0
