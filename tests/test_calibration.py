"""Calibration: ECE/MCE against a slow per-bin loop and sklearn's calibration_curve, Brier/NLL against sklearn,
temperature scaling on over- and under-confident synthetic models, T = 1 bit-identity, the reliability PNG."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.special import logsumexp, softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from jaxmed.evaluate import calibration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _calibrated(num_examples, seed, num_classes=4):
    """Logits of a decent linear classifier and labels DRAWN from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(num_classes, 8)) * 0.8  # one task for every draw
    features = centres[rng.integers(0, num_classes, num_examples)] + rng.normal(size=(num_examples, 8))
    logits = features @ centres.T
    cumulative = np.cumsum(softmax(logits, axis=1), axis=1)
    labels = np.minimum((rng.random(num_examples)[:, None] > cumulative).sum(1), num_classes - 1)
    return logits, labels


def _slow_bins(labels, probabilities, bins, adaptive):
    """(gap, count) per non-empty bin, one image at a time: (b/bins, (b+1)/bins] or consecutive equal-size chunks."""
    confidence = [max(row) for row in probabilities]
    correct = [int(np.argmax(row) == y) for row, y in zip(probabilities, labels)]
    if adaptive:
        order = sorted(range(len(labels)), key=lambda i: confidence[i])
        size, extra = divmod(len(labels), bins)
        members, start = [], 0
        for b in range(bins):
            stop = start + size + (1 if b < extra else 0)
            members.append(order[start:stop])
            start = stop
    else:
        members = [[i for i, c in enumerate(confidence) if b / bins < c <= (b + 1) / bins or (b == 0 and c == 0)]
                   for b in range(bins)]
    return [(abs(sum(correct[i] for i in m) / len(m) - sum(confidence[i] for i in m) / len(m)), len(m))
            for m in members if m]


def _edge_hitting(seed, num_examples=600):
    """Binary probabilities, a third of them with a confidence exactly on a 1/15 bin edge."""
    rng = np.random.default_rng(seed)
    positive = rng.uniform(0, 1, num_examples)
    positive[::3] = rng.integers(0, 16, len(positive[::3])) / 15
    labels = (rng.random(num_examples) < positive).astype(int)
    return labels, np.stack([1 - positive, positive], 1)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("data", ["multiclass", "edges"])
def test_ece_and_mce_match_a_slow_per_bin_loop(adaptive, data):
    if data == "edges":
        labels, probabilities = _edge_hitting(0)
    else:
        logits, labels = _calibrated(700, seed=5)
        probabilities = softmax(2.5 * logits, axis=1)
    for bins in (15, 7):
        slow = _slow_bins(labels, probabilities, bins, adaptive)
        ece = sum(gap * count for gap, count in slow) / len(labels)
        assert calibration.expected_calibration_error(labels, probabilities, bins, adaptive) == pytest.approx(ece)
        assert calibration.maximum_calibration_error(labels, probabilities, bins, adaptive) == pytest.approx(
            max(gap for gap, _ in slow))
        counts = [c for c in calibration.reliability_bins(labels, probabilities, bins, adaptive)["count"] if c]
        assert counts == [count for _, count in slow]


def test_a_confidence_on_an_edge_falls_in_the_bin_below():
    # Confidences 10/15 and 12/15 exactly, and 0.5: bins are (lower, upper], so they land in bins 9, 11 and 7.
    positive = np.array([10 / 15, 12 / 15, 0.5])
    result = calibration.reliability_bins([1, 0, 0], np.stack([1 - positive, positive], 1))
    assert [b for b, count in enumerate(result["count"]) if count] == [7, 9, 11]
    assert result["accuracy"][9] == 1.0 and result["accuracy"][11] == 0.0 and result["accuracy"][7] == 1.0
    assert result["confidence"][0] is None and result["lower"][9] == pytest.approx(9 / 15)


def test_binary_reliability_matches_sklearn_calibration_curve():
    labels, probabilities = _edge_hitting(1)
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    bins = calibration.reliability_bins(labels, probabilities)
    assert np.allclose([a for a in bins["accuracy"] if a is not None], accuracy, rtol=0, atol=1e-12)
    assert np.allclose([c for c in bins["confidence"] if c is not None], mean_confidence, rtol=0, atol=1e-12)
    # When class 1 is always the top label, top-label reliability is sklearn's positive-class curve itself.
    upper = probabilities[:, 1] >= 0.5 + 1e-9
    fraction_positive, mean_positive = calibration_curve(labels[upper], probabilities[upper, 1], n_bins=15)
    bins = calibration.reliability_bins(labels[upper], probabilities[upper])
    assert np.allclose([a for a in bins["accuracy"] if a is not None], fraction_positive, rtol=0, atol=1e-12)
    assert np.allclose([c for c in bins["confidence"] if c is not None], mean_positive, rtol=0, atol=1e-12)


def test_brier_and_nll_match_sklearn_and_the_definition():
    logits, labels = _calibrated(500, seed=2)
    probabilities = softmax(logits, axis=1)
    assert calibration.brier_score(labels, probabilities) == pytest.approx(
        brier_score_loss(labels, probabilities, labels=range(4), scale_by_half=False), rel=1e-12)
    assert calibration.negative_log_likelihood(labels, probabilities) == pytest.approx(
        -np.mean(np.log(probabilities[np.arange(500), labels])), rel=1e-12)
    binary = np.stack([1 - probabilities[:, 0], probabilities[:, 0]], 1)
    is_zero = (labels == 0).astype(int)
    assert calibration.brier_score(is_zero, binary) == pytest.approx(2 * brier_score_loss(is_zero, binary[:, 1]))
    # A class that never occurs in the labels still counts in the NLL's class list (labels=range(K)).
    assert calibration.negative_log_likelihood(np.zeros(3, int), np.full((3, 3), 1 / 3)) == pytest.approx(np.log(3))


def test_calibrated_data_has_a_small_ece_and_a_temperature_near_one():
    logits, labels = _calibrated(3000, seed=1)
    probabilities = softmax(logits, axis=1)
    assert calibration.expected_calibration_error(labels, probabilities) < 0.03
    assert calibration.expected_calibration_error(labels, probabilities, adaptive=True) < 0.03
    assert 0.85 < calibration.fit_temperature(logits, labels) < 1.15


@pytest.mark.parametrize("scale", [4.0, 0.3])
def test_temperature_scaling_fixes_over_and_under_confidence(scale):
    val_logits, val_labels = _calibrated(3000, seed=1)
    test_logits, test_labels = _calibrated(3000, seed=2)
    temperature = calibration.fit_temperature(scale * val_logits, val_labels)
    assert temperature > 1.5 if scale > 1 else temperature < 0.6
    assert temperature == pytest.approx(scale, rel=0.15)  # undoes the distortion
    before = softmax(scale * test_logits, axis=1)
    after = calibration.apply_temperature(scale * test_logits, temperature)
    ece_before = calibration.expected_calibration_error(test_labels, before)
    ece_after = calibration.expected_calibration_error(test_labels, after)
    assert ece_before > 0.08 and ece_after < 0.03 and ece_after < ece_before / 3
    assert np.array_equal(before.argmax(1), after.argmax(1))  # scaling never changes a prediction
    assert calibration.negative_log_likelihood(test_labels, after) < calibration.negative_log_likelihood(
        test_labels, before)


def test_fit_temperature_finds_the_grid_minimum_of_the_validation_nll():
    logits, labels = _calibrated(400, seed=3)
    logits = 2.0 * logits
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    scaled = logits[None] / grid[:, None, None]  # (grid, images, classes): every candidate T at once
    log_probabilities = scaled - logsumexp(scaled, axis=2, keepdims=True)
    nll = -log_probabilities[:, np.arange(len(labels)), labels].mean(1)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3)
    assert calibration.negative_log_likelihood(labels, calibration.apply_temperature(logits, fitted)) <= min(nll) + 1e-9


def test_temperature_one_is_bit_identical_to_the_plain_float64_softmax():
    logits = np.random.default_rng(0).normal(scale=5, size=(257, 5)).astype(np.float32)
    plain = softmax(logits.astype(np.float64), axis=-1)
    scaled = calibration.apply_temperature(logits, 1.0)
    assert scaled.dtype == np.float64 and np.array_equal(scaled, plain)
    extreme = calibration.apply_temperature(np.array([[1000.0, -1000.0, 0.0]]), 0.5)  # stable: no overflow
    assert np.isfinite(extreme).all() and extreme[0, 0] == 1.0


def test_calibration_metrics_is_json_serialisable_and_consistent():
    logits, labels = _calibrated(400, seed=4)
    probabilities = softmax(3 * logits, axis=1)
    report = json.loads(json.dumps(calibration.calibration_metrics(labels, probabilities), allow_nan=False))
    assert set(report) == {"num_examples", "ece_15", "ece_adaptive_15", "mce", "brier", "brier_kind", "nll", "bins"}
    assert report["ece_15"] == calibration.expected_calibration_error(labels, probabilities, 15)
    assert report["ece_adaptive_15"] == calibration.expected_calibration_error(labels, probabilities, 15, True)
    assert report["mce"] >= report["ece_15"] > 0 and sum(report["bins"]["count"]) == 400
    assert len(report["bins"]["accuracy"]) == 15


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 5


def test_reliability_diagram_writes_a_png_with_and_without_the_scaled_curve(tmp_path):
    logits, labels = _calibrated(500, seed=6)
    before = softmax(4 * logits, axis=1)
    calibration.reliability_diagram(labels, before, tmp_path / "plain.png")
    after = calibration.apply_temperature(4 * logits, 4.0)
    calibration.reliability_diagram(labels, before, tmp_path / "nested" / "both.png", probabilities_after=after,
                                    title="test split")
    _assert_png(tmp_path / "plain.png")
    _assert_png(tmp_path / "nested" / "both.png")


def test_errors_say_what_was_wrong():
    logits, labels = _calibrated(20, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        calibration.expected_calibration_error(labels, logits)  # logits instead of probabilities
    with pytest.raises(ValueError, match="sum to 1"):
        calibration.brier_score(labels, 2 * softmax(logits, axis=1))  # non-negative but not normalised
    with pytest.raises(ValueError, match="non-negative"):
        calibration.brier_score([0, 1], [[1.5, -0.5], [0.5, 0.5]])  # rows sum to 1 but are not probabilities
    with pytest.raises(ValueError, match="shape"):
        calibration.brier_score(labels[:5], softmax(logits, axis=1))
    with pytest.raises(ValueError, match="integers"):
        calibration.negative_log_likelihood(labels + 4, softmax(logits, axis=1))
    with pytest.raises(ValueError, match="temperature"):
        calibration.apply_temperature(logits, 0.0)
    with pytest.raises(ValueError, match="val_labels"):
        calibration.fit_temperature(logits, labels[:-1])
