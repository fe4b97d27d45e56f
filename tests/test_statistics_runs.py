"""Cross-validation means and compare's paired statistics on run directories the tests write themselves."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from jaxmed import crossval
from jaxmed.evaluate import metrics, report

NAMES = ["common", "other", "rare"]


def _probabilities(predictions, num_classes=3, confidence=0.8):
    probabilities = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def _fold(workdir, fold, labels, groups=None):
    """A finished fold: a perfect classifier's report.json, predictions.csv and splits.csv."""
    out = workdir / f"fold_{fold}" / "eval" / "test"
    out.mkdir(parents=True)
    ids = [f"f{fold}_img{i}.png" for i in range(len(labels))]
    probabilities = _probabilities(labels)
    (out / "report.json").write_text(json.dumps(metrics.classification_metrics(labels, probabilities, NAMES,
                                                                               bootstrap=0)))
    report.write_predictions(out / "predictions.csv", ids, labels, probabilities, NAMES)
    rows = "".join(f"{image_id},test,{NAMES[label]},{'' if groups is None else groups[i]}\n"
                   for i, (image_id, label) in enumerate(zip(ids, labels)))
    (workdir / f"fold_{fold}" / "splits.csv").write_text("id,split,class,group\n" + rows)


def test_cv_fold_means_leave_out_folds_without_the_class(tmp_path):
    # The rare class is in folds 0 and 1 only, always found: its recall is 1, not the mean of [1, 1, 0].
    for fold, labels in enumerate([np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 0, 2]), np.array([0, 1, 0, 1, 0])]):
        _fold(tmp_path, fold, labels, groups=[f"p{fold}_{i // 2}" for i in range(len(labels))])
    summary = crossval.summarise(tmp_path, 3, SimpleNamespace(bootstrap=50, seed=0))
    rare = summary["metrics"]["recall/rare"]
    assert rare["values"] == [1.0, 1.0, None]
    assert rare["mean"] == 1.0
    assert any("rare is absent from 1 of 3 folds" in note for note in summary["notes"])
    assert summary["metrics"]["f1_macro"]["values"] == [1.0, 1.0, 1.0]  # the fold without it: macro over present
    assert summary["pooled"]["ci95_methods"]["f1_macro"]["unit"] == "patient"  # groups from the folds' splits.csv
    assert "rare is absent" in (tmp_path / "cv" / "summary.md").read_text()
