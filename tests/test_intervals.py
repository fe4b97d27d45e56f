"""Intervals that hold at 0 and 1 and by patient; absent classes; honest temperatures; the binary Brier; full-precision
predictions.csv. Each test builds its own data and failed on the percentile-bootstrap / 6-digit code it replaced."""

import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from jaxmed.evaluate import calibration, intervals, metrics, report

TOLERANCE_Z = 3  # coverage within 3 binomial standard errors of 95%


def _probabilities(predictions, num_classes, confidence=0.9):
    probabilities = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def _lowest_coverage(draws):
    return 0.95 - TOLERANCE_Z * np.sqrt(0.95 * 0.05 / draws)


def test_perfect_accuracy_has_an_interval_of_honest_width():
    # 200 images all right: the percentile bootstrap said [1, 1]; the Wilson interval is 0.981–1.
    labels = np.arange(200) % 4
    result = metrics.classification_metrics(labels, _probabilities(labels, 4), ["a", "b", "c", "d"], bootstrap=200)
    low, high = result["ci95"]["accuracy"]
    assert high == 1.0 and low == pytest.approx(0.9812, abs=5e-4)
    for name in "abcd":  # 50 per class, all found
        assert result["ci95"]["recall"][name][0] == pytest.approx(0.9287, abs=5e-4)
    assert result["ci95_methods"]["accuracy"] == {"method": "Wilson score", "unit": "image", "note": None}
    # The bootstrap of κ and F1 has no spread here: BCa is undefined, so percentile, with the reason recorded.
    assert "every resample gave the same value" in result["ci95_methods"]["f1_macro"]["note"]
    json.dumps(result, allow_nan=False)


def test_two_positives_both_found_is_far_from_certain():
    labels = np.array([0] * 20 + [1, 1])
    result = metrics.classification_metrics(labels, _probabilities(labels, 2), ["normal", "disease"], bootstrap=100)
    assert result["ci95"]["sensitivity"][0] < 0.4  # Wilson: 0.342; the percentile bootstrap gave [1, 1]
    assert intervals.proportion_interval(2, 2, "clopper-pearson")[0] == pytest.approx(0.1581, abs=1e-4)


@pytest.mark.parametrize("method", ["wilson", "clopper-pearson"])
def test_proportion_coverage_at_097_on_30_positives(method):
    # The review: a percentile bootstrap covered a true sensitivity of 0.97 on 30 positives 61% of the time.
    rng = np.random.default_rng(23)
    draws = 400
    found = rng.binomial(30, 0.97, size=draws)
    covered = [low <= 0.97 <= high for low, high in (intervals.proportion_interval(k, 30, method) for k in found)]
    assert np.mean(covered) >= _lowest_coverage(draws)


def _clustered_draw(rng, patients=150, truth=0.85, concentration=3.0):
    """Patients of 1–8 images whose accuracy varies between patients (mean `truth`): images are not independent."""
    sizes = rng.integers(1, 9, patients)
    per_patient = rng.beta(truth * concentration, (1 - truth) * concentration, patients)
    groups = np.repeat(np.arange(patients), sizes)
    return rng.random(len(groups)) < per_patient[groups], groups


def test_clustered_images_need_the_patient_as_the_unit():
    rng = np.random.default_rng(5)
    draws, truth = 300, 0.85
    covered = {"image": 0, "patient": 0, "patient bootstrap": 0}
    for draw in range(draws):
        correct, groups = _clustered_draw(rng)
        for unit, entry in (("image", intervals.proportion_entry(correct)),
                            ("patient", intervals.proportion_entry(correct, groups))):
            covered[unit] += entry["ci95"][0] <= truth <= entry["ci95"][1]
        made = intervals.bootstrap_interval(lambda w, c=correct: (w @ c) / w.sum(1), len(correct), groups=groups,
                                            resamples=400, seed=draw)
        assert made["unit"] == "patient"
        covered["patient bootstrap"] += made["ci95"][0] <= truth <= made["ci95"][1]
    coverage = {unit: count / draws for unit, count in covered.items()}
    assert coverage["image"] < 0.85  # independence is badly wrong here (the review measured 77%)
    assert coverage["patient"] >= _lowest_coverage(draws)
    assert coverage["patient bootstrap"] >= _lowest_coverage(draws)
    assert coverage["patient bootstrap"] <= 0.99  # and not vacuously wide


def test_classification_metrics_with_groups_resamples_patients():
    rng = np.random.default_rng(2)
    correct, groups = _clustered_draw(rng)
    labels = rng.integers(0, 2, len(correct))
    predictions = np.where(correct, labels, 1 - labels)
    probabilities = _probabilities(predictions, 2, confidence=0.7) + rng.uniform(0, 0.01, (len(labels), 1)) * [1, -1]
    alone = metrics.classification_metrics(labels, probabilities, ["a", "b"], bootstrap=300)
    clustered = metrics.classification_metrics(labels, probabilities, ["a", "b"], bootstrap=300,
                                               groups=groups.astype(str))
    assert {made["unit"] for made in clustered["ci95_methods"].values()} == {"patient"}
    assert {made["unit"] for made in alone["ci95_methods"].values()} == {"image"}
    width = {name: r["ci95"]["accuracy"][1] - r["ci95"]["accuracy"][0] for name, r in (("alone", alone),
                                                                                        ("clustered", clustered))}
    assert width["clustered"] > 1.2 * width["alone"]


def test_absent_class_is_na_and_left_out_of_macro_averages():
    labels = np.array([0, 0, 1, 1, 1, 0])  # class c absent; the classifier is perfect
    result = metrics.classification_metrics(labels, _probabilities(labels, 3), ["a", "b", "c"], bootstrap=50)
    assert result["per_class"]["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert result["macro"]["f1"] == 1.0 and result["macro"]["recall"] == 1.0  # was 0.6667
    assert result["ci95"]["f1_macro"] == [1.0, 1.0]
    assert len(result["notes"]) == 1 and "c" in result["notes"][0]
    text = report.markdown(result | {"split": "test"})
    assert "| c | n/a | n/a | n/a | n/a | 0 |" in text
    assert "Note: 1 of 3 classes have no images" in text


def test_temperature_is_kept_at_one_when_val_has_no_errors():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = np.stack([-(2 * labels - 1) * 3.0, (2 * labels - 1) * 3.0], 1) + rng.normal(0, 0.5, (200, 2))
    assert (logits.argmax(1) == labels).all()
    assert calibration.fit_temperature(logits, labels) < 0.1  # what was applied before: every probability → 1
    chosen = calibration.choose_temperature(logits, labels)
    assert chosen["temperature"] == 1.0 and not chosen["applied"]
    assert "no misclassified image" in chosen["reason"]


def test_temperature_at_the_search_bound_is_not_applied():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    logits = rng.normal(0, 1e-4, (300, 2))  # no information at all: NLL falls as T grows without bound
    logits[0] = [0, 1e-3] if labels[0] == 0 else [1e-3, 0]  # at least one error
    chosen = calibration.choose_temperature(logits, labels)
    assert chosen["fitted"] == pytest.approx(20.0, rel=1e-2)
    assert chosen["temperature"] == 1.0 and "search bound" in chosen["reason"]
    good = rng.integers(0, 2, 400)
    informative = np.stack([-(2 * good - 1), 2 * good - 1], 1) * 2.0 + rng.normal(0, 2.0, (400, 2))
    assert calibration.choose_temperature(informative, good)["applied"]


def test_binary_brier_is_the_positive_class_brier():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 100)
    p1 = np.clip(labels * 0.6 + rng.uniform(0, 0.4, 100), 0, 1)
    probabilities = np.stack([1 - p1, p1], 1)
    result = calibration.calibration_metrics(labels, probabilities)
    assert result["brier"] == pytest.approx(brier_score_loss(labels, p1))  # was twice this
    assert result["brier_kind"].startswith("binary Brier")
    three = calibration.calibration_metrics(labels, np.c_[probabilities * 0.5, np.full(100, 0.5)])
    assert three["brier_kind"] == "multi-class Brier (sum over classes)"


def test_predictions_csv_round_trips_probabilities_and_logits(tmp_path):
    # Over-confident scores: at 6 significant digits they became exact ties (1 and 1) and AUC changed.
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    logits = np.stack([np.zeros(300), 14 + 3 * labels + rng.normal(0, 1.5, 300)], 1)
    probabilities = calibration.apply_temperature(logits, 1.0)
    probabilities[0] = [0.5 + 1e-9, 0.5 - 1e-9]  # prediction x, however close
    path = tmp_path / "predictions.csv"
    report.write_predictions(path, [f"img{i}" for i in range(300)], labels, probabilities, ["x", "y"], logits=logits)
    ids, read_labels, read_probabilities, read_logits, names = report.read_predictions_with_logits(path)
    assert names == ["x", "y"] and (read_labels == labels).all()
    assert np.array_equal(read_probabilities, probabilities) and np.array_equal(read_logits, logits)
    assert read_probabilities[0].argmax() == 0
    first = metrics.roc_auc(labels, probabilities, names)["macro"]
    assert metrics.roc_auc(read_labels, read_probabilities, names)["macro"] == first


def test_old_predictions_csv_without_logits_is_still_read(tmp_path, caplog):
    path = tmp_path / "predictions.csv"
    path.write_text("id,label,prediction,p_x,p_y\na.png,x,x,0.9,0.1\nb.png,y,y,0.25,0.75\n")
    ids, labels, probabilities, logits, names = report.read_predictions_with_logits(path)
    assert ids == ["a.png", "b.png"] and labels.tolist() == [0, 1] and logits is None
    assert probabilities.tolist() == [[0.9, 0.1], [0.25, 0.75]]
    assert report.read_predictions(path)[3] == ["x", "y"]
    assert "recorded prediction" not in caplog.text
    path.write_text("id,label,prediction,p_x,p_y\na.png,y,y,0.5,0.5\n")  # 0.4999996 / 0.5000004 at 6 digits
    report.read_predictions(path)
    assert "1 rows' recorded prediction is not the arg-max" in caplog.text


def test_reports_say_why_the_temperature_was_not_applied():
    labels = np.array([0, 1, 1, 0])
    result = metrics.classification_metrics(labels, _probabilities(labels, 2), ["normal", "disease"], bootstrap=0)
    calibrated = calibration.calibration_metrics(labels, _probabilities(labels, 2))
    result["calibration"] = {"temperature": 1.0, "fitted_on": None, "applied": False, "before": calibrated,
                             "after": calibrated, "not_applied_reason": "validation has no misclassified image"}
    text = report.markdown(result)
    assert "no temperature scaling (T = 1), because validation has no misclassified image" in text
    assert "binary Brier (positive class: class 1)" in text


def test_bca_gives_way_to_percentile_on_very_many_units(monkeypatch):
    monkeypatch.setattr(intervals, "BCA_MAX_UNITS", 50)
    correct = np.random.default_rng(0).random(100) < 0.7
    made = intervals.bootstrap_interval(lambda w: (w @ correct) / w.sum(1), 100, resamples=200)
    assert made["method"] == "percentile bootstrap" and "too costly" in made["note"]
    assert made["ci95"][0] < correct.mean() < made["ci95"][1]


def test_clopper_pearson_can_be_chosen_for_proportions():
    labels = np.arange(30) % 2
    result = metrics.classification_metrics(labels, _probabilities(labels, 2), ["a", "b"], bootstrap=0,
                                            proportion_method="clopper-pearson")
    assert result["ci95"]["accuracy"] == pytest.approx([0.025 ** (1 / 30), 1.0])  # exact: (α/2)^(1/n) for n of n
    assert result["ci95_methods"]["recall"]["method"] == "Clopper–Pearson exact"
