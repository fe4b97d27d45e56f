"""Metrics: scikit-learn's numbers (and a hand-computed case), ROC AUC, bootstrap intervals, operating points."""

import json
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmed.evaluate import metrics

NAMES4 = ["glioma", "meningioma", "no_tumor", "pituitary"]


def _one_hot_probabilities(predictions, num_classes, confidence=0.7):
    """Probabilities whose arg-max is `predictions`."""
    probabilities = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def _noisy_classifier(num_examples, num_classes, seed=0, signal=0.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_examples)
    probabilities = rng.dirichlet(np.ones(num_classes), num_examples)
    probabilities[np.arange(num_examples), labels] += signal
    return labels, probabilities / probabilities.sum(1, keepdims=True)


def _with_accuracy(num_examples, accuracy, num_classes=2):
    """Balanced labels, exactly `accuracy` of them predicted right, mistakes spread over classes."""
    labels = np.arange(num_examples) % num_classes
    predictions = labels.copy()
    wrong = np.random.default_rng(1).permutation(num_examples)[:round((1 - accuracy) * num_examples)]
    predictions[wrong] = (labels[wrong] + 1) % num_classes
    return labels, _one_hot_probabilities(predictions, num_classes)


def test_hand_computed_three_classes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    report = metrics.classification_metrics(labels, _one_hot_probabilities(predictions, 3), ["a", "b", "c"],
                                            bootstrap=0)
    assert report["num_examples"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # p_o = 4/6; p_e = (2·2 + 2·3 + 2·1) / 36 = 1/3; κ = (2/3 − 1/3) / (1 − 1/3) = 1/2
    assert report["cohen_kappa"] == pytest.approx(0.5)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["per_class"]["a"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert report["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "support": 2})
    assert report["macro"]["f1"] == pytest.approx((1 / 2 + 0.8 + 2 / 3) / 3)
    assert report["macro"]["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # bootstrap=0 turns off the resampled intervals only; proportions keep their closed-form (Wilson) ones.
    assert report["ci95"]["f1_macro"] is None and report["ci95"]["cohen_kappa"] is None
    assert report["ci95"]["accuracy"][0] < 4 / 6 < report["ci95"]["accuracy"][1]
    assert "sensitivity" not in report


def test_equals_scikit_learn_on_random_predictions():
    labels, probabilities = _noisy_classifier(300, 4, seed=3)
    predictions = probabilities.argmax(-1)
    report = metrics.classification_metrics(labels, probabilities, NAMES4, bootstrap=10)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predictions))
    assert report["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(labels, predictions))
    assert report["confusion_matrix"] == skm.confusion_matrix(labels, predictions).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predictions)
    for i, name in enumerate(NAMES4):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    assert report["weighted"]["f1"] == pytest.approx(skm.f1_score(labels, predictions, average="weighted"))
    assert report["macro"]["recall"] == pytest.approx(skm.recall_score(labels, predictions, average="macro"))
    assert report["class_names"] == NAMES4
    json.dumps(report, allow_nan=False)


def test_roc_auc_equals_scikit_learn_multiclass_and_binary():
    labels, probabilities = _noisy_classifier(200, 4, seed=4, signal=0.2)
    auc = metrics.classification_metrics(labels, probabilities, NAMES4, bootstrap=0)["roc_auc"]
    assert auc["macro"] == pytest.approx(skm.roc_auc_score(labels, probabilities, multi_class="ovr"))
    for i, name in enumerate(NAMES4):
        assert auc["per_class"][name] == pytest.approx(skm.roc_auc_score(labels == i, probabilities[:, i]))
    assert 0.5 < auc["macro"] < 1.0  # not degenerate, so the comparison above means something

    labels, probabilities = _noisy_classifier(200, 2, seed=5, signal=0.2)
    auc = metrics.classification_metrics(labels, probabilities, ["normal", "pneumonia"], bootstrap=0)["roc_auc"]
    assert auc["macro"] == pytest.approx(skm.roc_auc_score(labels, probabilities[:, 1]))


def test_class_absent_from_labels_gives_nulls_not_a_crash():
    labels, probabilities = _noisy_classifier(120, 4, seed=6)
    keep = labels != 2
    report = metrics.classification_metrics(labels[keep], probabilities[keep], NAMES4, bootstrap=50)
    assert report["roc_auc"]["per_class"]["no_tumor"] is None
    present = [report["roc_auc"]["per_class"][name] for name in ("glioma", "meningioma", "pituitary")]
    assert all(value is not None for value in present)
    assert report["roc_auc"]["macro"] == pytest.approx(np.mean(present))
    assert report["ci95"]["recall"]["no_tumor"] is None
    assert report["per_class"]["no_tumor"]["support"] == 0
    json.dumps(report, allow_nan=False)


def test_binary_sensitivity_and_specificity():
    # positives (class 1): 4, of which 3 flagged; negatives: 6, of which 5 kept negative.
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    predictions = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 1])
    report = metrics.classification_metrics(labels, _one_hot_probabilities(predictions, 2), ["normal", "pneumonia"],
                                            bootstrap=0)
    assert report["sensitivity"] == pytest.approx(3 / 4)
    assert report["specificity"] == pytest.approx(5 / 6)


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    labels, probabilities = _noisy_classifier(400, 4, seed=7)
    report = metrics.classification_metrics(labels, probabilities, NAMES4, seed=11)
    ci = report["ci95"]
    assert ci["accuracy"][0] < report["accuracy"] < ci["accuracy"][1]
    assert ci["f1_macro"][0] < report["macro"]["f1"] < ci["f1_macro"][1]
    for name in NAMES4:
        low, high = ci["recall"][name]
        assert low < report["per_class"][name]["recall"] < high
    again = metrics.classification_metrics(labels, probabilities, NAMES4, seed=11)["ci95"]
    assert again == ci
    other = metrics.classification_metrics(labels, probabilities, NAMES4, seed=12)["ci95"]
    assert other != ci


def test_bootstrap_width_matches_the_binomial_and_shrinks_with_more_examples():
    def accuracy_width(num_examples):
        labels, probabilities = _with_accuracy(num_examples, 0.8)
        report = metrics.classification_metrics(labels, probabilities, ["a", "b"], bootstrap=2000)
        assert report["accuracy"] == pytest.approx(0.8)
        low, high = report["ci95"]["accuracy"]
        return high - low

    small, large = accuracy_width(100), accuracy_width(2000)
    assert large < small / 3  # √20 ≈ 4.5 in theory
    # Resampling examples with replacement: accuracy's standard error is √(p(1−p)/n).
    assert large == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 2000), rel=0.15)


def test_bootstrap_draws_from_every_example():
    # Mistakes all at the end: a resampler that favours some positions would move the interval off 0.5.
    labels = np.zeros(400, dtype=int)
    predictions = np.r_[np.zeros(200, dtype=int), np.ones(200, dtype=int)]
    report = metrics.classification_metrics(labels, _one_hot_probabilities(predictions, 2), ["a", "b"])
    low, high = report["ci95"]["accuracy"]
    assert (low + high) / 2 == pytest.approx(0.5, abs=0.01)
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 400), rel=0.15)
    assert report["ci95"]["recall"]["a"] == pytest.approx([low, high])  # every example is class a
    assert report["ci95"]["recall"]["b"] is None


def test_bootstrap_is_fast():
    labels, probabilities = _noisy_classifier(400, 4, seed=8)
    start = time.perf_counter()
    metrics.classification_metrics(labels, probabilities, NAMES4, bootstrap=1000)
    assert time.perf_counter() - start < 2.0


def _recall_at(labels, probabilities, positive, threshold):
    return ((probabilities[:, positive] >= threshold) & (labels == positive)).sum() / (labels == positive).sum()


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_operating_point_is_the_largest_threshold_reaching_the_target(target):
    labels, probabilities = _noisy_classifier(300, 3, seed=9, signal=0.3)
    threshold = metrics.operating_point(labels, probabilities, 1, target)
    assert _recall_at(labels, probabilities, 1, threshold) >= target
    assert _recall_at(labels, probabilities, 1, np.nextafter(threshold, np.inf)) < target


def test_operating_point_exact_fraction_is_not_rounded_up():
    # 10 positives with scores 0.1 … 1.0: recall 0.9 needs 9 of them, so t = 0.2 (ceil(0.9·10) can give 10).
    labels = np.array([1] * 10 + [0] * 5)
    scores = np.concatenate([np.linspace(0.1, 1.0, 10), np.full(5, 0.05)])
    probabilities = np.stack([1 - scores, scores], 1)
    assert metrics.operating_point(labels, probabilities, 1, 0.9) == pytest.approx(0.2)


def test_operating_point_errors():
    labels, probabilities = _noisy_classifier(50, 3, seed=10)
    with pytest.raises(ValueError, match="class 2 has no examples"):
        metrics.operating_point(labels[labels != 2], probabilities[labels != 2], 2, 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        metrics.operating_point(labels, probabilities, 1, 0.0)
    with pytest.raises(ValueError, match="positive=3"):
        metrics.operating_point(labels, probabilities, 3, 0.9)


def test_apply_operating_point_counts_positive_vs_rest():
    labels = np.array([0, 1, 2, 2, 2, 1, 0, 2])
    p2 = np.array([0.1, 0.6, 0.9, 0.5, 0.2, 0.3, 0.7, 0.8])
    probabilities = np.stack([(1 - p2) / 2, (1 - p2) / 2, p2], 1)
    result = metrics.apply_operating_point(labels, probabilities, 2, 0.5, ["a", "b", "c"])
    # flagged (p ≥ 0.5): indices 1, 2, 3, 6, 7 → positives flagged 2, 3, 7 (index 4 missed); false alarms 1, 6.
    assert result["flagged"] == 5
    assert result["num_positives"] == 4
    assert result["sensitivity"] == pytest.approx(3 / 4)
    assert result["specificity"] == pytest.approx(2 / 4)
    assert result["precision"] == pytest.approx(3 / 5)
    assert result["confusion_matrix"] == [[2, 2], [1, 3]]
    assert result["confusion_matrix_labels"] == ["not c", "c"]
    assert result["positive"] == "c" and result["threshold"] == 0.5


def test_threshold_from_validation_applied_to_test():
    val_labels, val_probabilities = _noisy_classifier(400, 2, seed=12, signal=0.3)
    threshold = metrics.operating_point(val_labels, val_probabilities, 1, 0.95)
    on_val = metrics.apply_operating_point(val_labels, val_probabilities, 1, threshold, ["normal", "pneumonia"])
    assert on_val["sensitivity"] >= 0.95
    default = metrics.classification_metrics(val_labels, val_probabilities, ["normal", "pneumonia"], bootstrap=0)
    assert on_val["sensitivity"] > default["sensitivity"]  # the point of moving the threshold


def test_input_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="3 columns but there are 2 class names"):
        metrics.classification_metrics([0, 1], np.full((2, 3), 1 / 3), ["a", "b"])
    with pytest.raises(ValueError, match="labels must be integers"):
        metrics.classification_metrics([0, 5], np.full((2, 2), 0.5), ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_metrics([0, 1, 1], np.full((2, 2), 0.5), ["a", "b"])
