"""A run's checkpoint under acquisition shift: every corruption × severity of the evaluated split's images, through
the run's own predictor and calibration, → W/stress/<split>/: stress.json (one record per corruption × severity,
severity 0 the clean images), summary.json (MedMNIST-C's balanced error BE and relative BE), stress.md, figures and
stress.html.

The corruptions are applied to the split's images as the run caches them for evaluation (already resized and
cropped as the HF processor does, not yet normalised), so every artefact is seen at the resolution the model sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import numpy as np
from sklearn import metrics as skm
from tqdm import tqdm

from jaxmed import train
from jaxmed.train import run as train_run
from jaxmed.config import load_run_config
from jaxmed.errors import JaxmedError
from jaxmed.evaluate import calibration, conformal, metrics, ood
from jaxmed.stress import corruptions as jcorrupt
from jaxmed.stress import figures

log = logging.getLogger("jaxmed.stress")


def stress_workdir(workdir, split: str = "test", which: str = "best", names=None, severities=jcorrupt.SEVERITIES,
                   seed: int = 0) -> dict:
    """The CLI's work: rebuild the run, predict every corruption × severity, write W/stress/<split>/."""
    from jaxmed.train.checkpoint import Checkpoints, workdir_path

    chosen = select(names)
    severities = tuple(int(s) for s in severities)
    if any(s not in jcorrupt.SEVERITIES for s in severities):
        raise JaxmedError(f"--severities {','.join(map(str, severities))}: each must be one of "
                          f"{', '.join(map(str, jcorrupt.SEVERITIES))} (0, the clean images, is always included)")
    workdir = workdir_path(workdir)
    config = load_run_config(workdir)
    run = train.setup(config, workdir)
    if split not in run.dataset.splits or not run.dataset.splits[split].model_ready:
        have = [name for name, s in run.dataset.splits.items() if s.model_ready]
        raise JaxmedError(f"this run has no {split!r} split to stress (evaluation splits: {', '.join(have) or 'none'})"
                          f"; pass --split with one of them")
    checkpoints = Checkpoints.for_run(workdir, config.train)
    try:
        flat, _, source = checkpoints.restore_flat_weights(which)
    finally:
        checkpoints.close()
    params, stats = train.place_weights(run, flat)
    eval_step = train.make_eval_step(run)
    temperature, temperature_note = stored_temperature(workdir, source)
    notes = []
    fitted_sets = conformal.read_stored(workdir, source, temperature, run.dataset.class_names, notes)
    detectors = ood.load(workdir / "ood")
    if detectors is not None and detectors.meta.get("checkpoint") != source:
        notes.append(f"W/ood is for {detectors.meta.get('checkpoint')}, not {source}: no OOD flag rates")
        detectors = None
    features_step = train_run.make_features_step(run) if detectors is not None else None
    data = run.dataset.splits[split]
    clean = np.asarray(data.images)

    def evaluate(images) -> dict:
        shifted = dataclasses.replace(data, images=images)
        if features_step is None:
            indices, logits = train.predict(run, eval_step, params, stats, shifted)
        else:  # one pass gives the logits and the features the detectors read
            indices, features, logits = train_run.predict_features(run, features_step, params, stats, shifted)
        labels, probabilities = data.labels[indices], calibration.apply_temperature(logits, temperature)
        result = scores(labels, probabilities, run.dataset.class_names)
        if features_step is not None:  # does the run notice that these images are not like its training data?
            result["ood_flag_rate"] = float(detectors.score(features, logits)[1].mean())
        if fitted_sets is not None:  # the run's conformal sets: do they still hold the true class under the shift?
            sets = conformal.sets_for_stored(fitted_sets, probabilities,
                                             [conformal.image_digest(images[i]) for i in indices])
            result.update(conformal_coverage=float(sets[np.arange(len(labels)), labels].mean()),
                          mean_set_size=float(sets.sum(1).mean()))
        return result

    records = [{"corruption": "none", "severity": 0, **evaluate(clean)}]
    jobs = [(corruption, severity) for corruption in chosen for severity in severities]
    for corruption, severity in tqdm(jobs, desc=f"stress {split}", unit="set", mininterval=1.0,
                                     disable=jax.process_index() != 0):
        try:
            records.append({"corruption": corruption.name, "severity": severity,
                            **evaluate(jcorrupt.corrupt(clean, corruption, severity, seed))})
        except Exception as error:  # one broken corruption is reported, never the end of the run
            reason = (f"needs the optional package {corruption.needs} (pip install 'jaxmed[stress]')"
                      if isinstance(error, ImportError) and corruption.needs else f"{type(error).__name__}: {error}")
            records.append({"corruption": corruption.name, "severity": severity, "error": reason})
            log.warning("stress: %s at severity %d failed: %s", corruption.name, severity, reason)
    summary = summarise(records)
    summary.update(split=split, checkpoint=source, images=int(len(clean)), seed=seed, temperature=temperature,
                   temperature_note=temperature_note, notes=notes,
                   conformal=None if fitted_sets is None else {key: fitted_sets.get(key) for key in (
                       "method", "mondrian", "alpha", "calibration_split")},
                   ood=None if detectors is None else {"method": detectors.method}, applied_to="cached eval images (resized/cropped, before "
                   "normalisation)")
    if jax.process_index() == 0:
        write(workdir / "stress" / split, records, summary, clean, chosen, seed)
    return summary


def select(names) -> list[jcorrupt.Corruption]:
    if not names:
        return list(jcorrupt.CORRUPTIONS)
    unknown = [name for name in names if name not in jcorrupt.BY_NAME]
    if unknown:
        raise JaxmedError(f"unknown corruption {', '.join(unknown)}; known: {', '.join(jcorrupt.BY_NAME)}")
    return [jcorrupt.BY_NAME[name] for name in names]


def stored_temperature(workdir, source: str) -> tuple[float, str]:
    """The temperature the evaluation fitted for this checkpoint (W/calibration.json), so severity 0 reproduces the
    report's numbers; 1 when none was fitted for it."""
    path = workdir / "calibration.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("checkpoint") == source:
            return float(stored["temperature"]), f"T fitted on {stored.get('fitted_on')} for {source}"
    return 1.0, f"no temperature stored for {source}: uncalibrated probabilities"


def scores(labels, probabilities, class_names) -> dict:
    """The numbers each corruption × severity gets, computed as the evaluation report computes them."""
    predictions = probabilities.argmax(-1)
    return {"accuracy": float(skm.accuracy_score(labels, predictions)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
            "macro_auc": metrics.roc_auc(labels, probabilities, class_names)["macro"],
            "ece_15": calibration.expected_calibration_error(labels, probabilities, calibration.BINS)}


def summarise(records: list[dict]) -> dict:
    """MedMNIST-C's numbers without its reference model: balanced error BE = 1 − balanced accuracy, clean and per
    corruption (mean over severities), and the relative BE, rBE = mean over severities of (BE − BE clean), as the
    benchmark's rBE before it divides by its ResNet-18's; mBE and mrBE average over the corruptions."""
    clean = 1 - records[0]["balanced_accuracy"]
    per = {}
    for record in records[1:]:
        if "error" not in record:
            per.setdefault(record["corruption"], []).append(1 - record["balanced_accuracy"])
    corruptions = {name: {"BE": float(np.mean(errors)), "rBE": float(np.mean(errors) - clean),
                          "severities": len(errors)} for name, errors in per.items()}
    return {"BE_clean": float(clean), "mBE": _mean([c["BE"] for c in corruptions.values()]),
            "mrBE": _mean([c["rBE"] for c in corruptions.values()]), "corruptions": corruptions,
            "failed": sorted({r["corruption"] for r in records if "error" in r})}


def write(out, records, summary, clean, chosen, seed) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stress.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "stress.md").write_text(markdown(records, summary))
    good = [r for r in records if "error" not in r]
    figures.drop_heatmap(good, out / "stress_heatmap.png")
    figures.curves(good, out / "stress_curves.png")
    figures.examples(clean, chosen, seed, out / "stress_examples.png")
    from jaxmed.evaluate import html

    html.write_stress_html(out, records, summary)


SETS_HEADER = " conformal coverage | mean set size |"


def markdown(records, summary) -> str:
    sets = "conformal_coverage" in records[0]
    flags = "ood_flag_rate" in records[0]
    lines = [f"# Stress test: {summary['split']}, {summary['checkpoint']} ({summary['images']} images)", "",
             f"Corruptions applied to {summary['applied_to']}; {summary['temperature_note']}.", "",
             f"Balanced error clean BE = {summary['BE_clean']:.4f}; mean over corruptions and severities mBE = "
             f"{_text(summary['mBE'])}, mean relative BE (BE − BE clean) mrBE = {_text(summary['mrBE'])}.", "",
             "| corruption | severity | accuracy | balanced accuracy | macro AUC | ECE |" + SETS_HEADER * sets
             + " OOD flagged |" * flags, "|---|---|---|---|---|---|" + "---|---|" * sets + "---|" * flags]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['corruption']} | {r['severity']} | failed: {r['error']} | | | |" + " | |" * sets
                         + " |" * flags)
        else:
            lines.append(f"| {r['corruption']} | {r['severity']} | {r['accuracy']:.4f} | {r['balanced_accuracy']:.4f}"
                         f" | {_text(r['macro_auc'])} | {r['ece_15']:.4f} |" + (
                             f" {r['conformal_coverage']:.4f} | {r['mean_set_size']:.3f} |" if sets else "")
                         + (f" {r['ood_flag_rate']:.4f} |" if flags else ""))
    lines += ["", "| corruption | BE | rBE |", "|---|---|---|"]
    lines += [f"| {name} | {c['BE']:.4f} | {c['rBE']:+.4f} |" for name, c in summary["corruptions"].items()]
    return "\n".join(lines) + "\n"


def _mean(values) -> float | None:
    return float(np.mean(values)) if values else None


def _text(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
