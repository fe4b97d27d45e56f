"""Conformal prediction sets: coverage of 1 - alpha on simulated exchangeable scores over many seeded splits
(marginal, and per class for Mondrian, rare class included), identical sets to MAPIE (LAC, randomised APS) and
crepes (Mondrian), determinism of the randomised sets, the summary's Wilson intervals."""

import math

import numpy as np
import pytest
from scipy.special import softmax

from jaxmed.evaluate import conformal

ALPHA = 0.05


def _simulated(num_examples, rng, class_weights=(0.4, 0.3, 0.25, 0.05)):
    """Probabilities of an imperfect, miscalibrated classifier and labels drawn from the TRUE ones: exchangeable."""
    classes = len(class_weights)
    labels = rng.choice(classes, size=num_examples, p=class_weights)
    logits = rng.normal(size=(num_examples, classes)) + 1.5 * np.eye(classes)[labels]
    logits[:, -1] -= 1.0  # the rare class is also under-predicted: marginal sets tend to miss it
    return softmax(2.0 * logits, axis=1), labels  # over-confident


def _coverages(method, mondrian, trials=200, num_calibration=400, num_test=400):
    """Per trial: coverage overall and per class on the test part of a fresh seeded split."""
    overall, per_class, calibration_counts = [], [], []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        probabilities, labels = _simulated(num_calibration + num_test, rng)
        uniforms = rng.random(len(labels))
        calibrate, test = slice(0, num_calibration), slice(num_calibration, None)
        fitted = conformal.fit(probabilities[calibrate], labels[calibrate], method=method, alpha=ALPHA,
                               mondrian=mondrian, uniforms=uniforms[calibrate])
        sets = conformal.prediction_sets(probabilities[test], fitted, uniforms[test])
        covered = sets[np.arange(num_test), labels[test]]
        overall.append(covered.mean())
        per_class.append([covered[labels[test] == c].mean() for c in range(4)])
        calibration_counts.append(fitted["calibration_counts"])
    return np.asarray(overall), np.asarray(per_class), np.asarray(calibration_counts)


def _tolerance(count_calibration, count_test, trials):
    """4 standard errors of the mean coverage over trials: Beta spread of the threshold plus binomial test noise."""
    return 4 * math.sqrt(ALPHA * (1 - ALPHA) * (1 / (count_calibration + 2) + 1 / count_test) / trials)


@pytest.mark.parametrize("method", conformal.METHODS)
def test_marginal_coverage_within_binomial_tolerance(method):
    overall, per_class, _ = _coverages(method, mondrian=False)
    tolerance = _tolerance(400, 400, len(overall))
    # Split conformal: 1 - alpha <= E[coverage] <= 1 - alpha + 1 / (n + 1) for continuous scores.
    assert 1 - ALPHA - tolerance <= overall.mean() <= 1 - ALPHA + 1 / 401 + tolerance, overall.mean()
    if method == "lac":  # the reason for Mondrian: the rare, under-predicted class is left short
        assert per_class[:, 3].mean() < 1 - ALPHA - 0.05


@pytest.mark.parametrize("method", conformal.METHODS)
def test_mondrian_coverage_per_class_including_the_rare_class(method):
    overall, per_class, counts = _coverages(method, mondrian=True)
    weights = (0.4, 0.3, 0.25, 0.05)
    for c, weight in enumerate(weights):
        coverage = np.nanmean(per_class[:, c])
        smallest = counts[:, c].min()
        tolerance = _tolerance(400 * weight, 400 * weight, len(overall))
        assert 1 - ALPHA - tolerance <= coverage <= 1 - ALPHA + 1 / (smallest + 1) + tolerance, (c, coverage)
    assert overall.mean() >= 1 - ALPHA - _tolerance(400, 400, len(overall))


def test_a_class_too_rare_for_its_quantile_is_always_in_the_set():
    rng = np.random.default_rng(0)
    probabilities, labels = _simulated(300, rng)
    labels[labels == 3] = 0
    labels[:10] = 3  # 10 images: ceil(11 × 0.95) = 11 > 10
    fitted = conformal.fit(probabilities, labels, method="lac", alpha=ALPHA, mondrian=True)
    assert fitted["thresholds"][3] is None and fitted["calibration_counts"][3] == 10
    assert conformal.prediction_sets(probabilities, fitted)[:, 3].all()
    images = np.zeros((300, 2, 2, 3), np.uint8)
    section, _, _ = conformal.evaluate((probabilities, labels, images, np.arange(300)),
                                       (probabilities, labels, images, np.arange(300)), list("abcd"), method="lac",
                                       alpha=ALPHA, mondrian=True, seed=0, calibration_split="calibration",
                                       evaluated_split="test")
    assert "d: too few calibration images" in section["guarantee"] and "(fewer than 19)" in section["guarantee"]


def test_finite_sample_quantile_is_the_order_statistic():
    scores = np.arange(1.0, 20.0)  # n = 19: ceil(20 × 0.95) = 19 → the largest
    assert conformal.finite_sample_quantile(scores, 0.05) == 19.0
    assert conformal.finite_sample_quantile(scores, 0.5) == 10.0  # ceil(20 × 0.5) = 10
    assert conformal.finite_sample_quantile(scores[:18], 0.05) == math.inf


class _Fixed:
    """A prefit sklearn classifier whose predict_proba returns stored rows: X holds row numbers."""

    _estimator_type = "classifier"

    def __init__(self, probabilities):
        self.probabilities, self.classes_ = probabilities, np.arange(probabilities.shape[1])

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return self.probabilities[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)

    def __sklearn_tags__(self):
        from sklearn.utils import Tags, ClassifierTags, TargetTags

        return Tags(estimator_type="classifier", classifier_tags=ClassifierTags(),
                    target_tags=TargetTags(required=True))

    def __sklearn_is_fitted__(self):
        return True


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_same_sets_as_mapie(method):
    from mapie.classification import SplitConformalClassifier

    rng = np.random.default_rng(7)
    probabilities, labels = _simulated(1500, rng)
    calibrate, test = np.arange(700), np.arange(700, 1500)
    seed = 11
    mapie = SplitConformalClassifier(_Fixed(probabilities), confidence_level=1 - ALPHA, conformity_score=method,
                                     prefit=True, random_state=seed)
    mapie.conformalize(calibrate[:, None], labels[calibrate])
    params = {"include_last_label": "randomized"} if method == "aps" else None
    _, theirs = mapie.predict_set(test[:, None], conformity_score_params=params)
    theirs = theirs[:, :, 0]
    # MAPIE's APS score is cumsum(through y) − u·p_y = mass above y + (1 − u)·p_y: our u is 1 − its u, and it
    # draws u afresh from RandomState(seed) in conformalize and in predict_set.
    uniforms_calibrate = 1 - np.random.RandomState(seed).uniform(size=len(calibrate))
    uniforms_test = 1 - np.random.RandomState(seed).uniform(size=len(test))
    fitted = conformal.fit(probabilities[calibrate], labels[calibrate], method=method, alpha=ALPHA, mondrian=False,
                           uniforms=uniforms_calibrate if method == "aps" else None)
    ours = conformal.prediction_sets(probabilities[test], fitted, uniforms_test if method == "aps" else None)
    assert np.isclose(fitted["thresholds"][0], float(np.ravel(mapie._mapie_classifier.conformity_score_function_
                                                              .quantiles_)[0]))
    assert (ours == theirs).all(), np.flatnonzero((ours != theirs).any(1))
    assert len(np.unique(ours.sum(1))) > 1  # sets of several sizes: not a degenerate case


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_mondrian_sets_same_as_crepes(method):
    from crepes import ConformalClassifier

    rng = np.random.default_rng(3)
    # Per-class calibration counts with (n + 1) · alpha not an integer: there crepes' p >= alpha and the
    # ceil((n+1)(1-alpha))-th score differ by one order statistic (a p-value exactly alpha).
    counts = (203, 117, 88, 41)
    labels = np.repeat(np.arange(4), counts)
    probabilities, _ = _simulated(len(labels), rng)
    test_probabilities, _ = _simulated(600, rng)
    uniforms, test_uniforms = rng.random(len(labels)), rng.random(600)
    scores = conformal.nonconformity(probabilities, method, uniforms)[np.arange(len(labels)), labels]
    test_scores = conformal.nonconformity(test_probabilities, method, test_uniforms)
    crepes = ConformalClassifier().fit(scores, bins=labels)
    theirs = np.stack([crepes.predict_set(test_scores[:, c], bins=np.full(600, c), confidence=1 - ALPHA,
                                          smoothing=False) for c in range(4)], axis=1).astype(bool)
    fitted = conformal.fit(probabilities, labels, method=method, alpha=ALPHA, mondrian=True, uniforms=uniforms)
    ours = conformal.prediction_sets(test_probabilities, fitted, test_uniforms)
    assert (ours == theirs).all()
    assert len(set(fitted["thresholds"])) == 4  # one threshold per class
    marginal = ConformalClassifier().fit(scores).predict_set(test_scores, confidence=1 - ALPHA, smoothing=False)
    fitted = conformal.fit(probabilities, labels, method=method, alpha=ALPHA, mondrian=False, uniforms=uniforms)
    assert (conformal.prediction_sets(test_probabilities, fitted, test_uniforms) == marginal.astype(bool)).all()


def test_randomisation_depends_on_the_image_and_seed_only():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    digests = [conformal.image_digest(image) for image in images]
    first = conformal.uniforms_for(digests, seed=0)
    again = conformal.uniforms_for([conformal.image_digest(image.copy()) for image in images[::-1]], seed=0)[::-1]
    assert (first == again).all() and len(set(first)) == 6 and ((0 <= first) & (first < 1)).all()
    assert not np.allclose(first, conformal.uniforms_for(digests, seed=1))


def test_summary_rates_and_wilson_intervals():
    from statsmodels.stats.proportion import proportion_confint

    sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1]], bool)
    labels = np.array([0, 2, 1, 2, 2])
    result = conformal.summary(labels, sets, ["a", "b", "c"])
    assert result["coverage"]["value"] == 3 / 5
    assert result["coverage"]["ci95"] == list(proportion_confint(3, 5, method="wilson"))
    assert result["coverage_per_class"]["c"]["value"] == 2 / 3 and result["coverage_per_class"]["b"]["value"] == 0
    assert result["mean_set_size"] == 6 / 5 and result["singleton_rate"] == 2 / 5 and result["empty_rate"] == 1 / 5
    assert result["set_size_counts"] == [1, 2, 2, 0]
    assert conformal.set_labels(sets[:3], ["a", "b", "c"]) == ["a", "a|b", ""]


def _evaluate(calibration_split, seed=0):
    rng = np.random.default_rng(5)
    probabilities, labels = _simulated(400, rng)
    images = rng.integers(0, 256, size=(400, 4, 4, 3), dtype=np.uint8)
    return conformal.evaluate((probabilities[:300], labels[:300], images, np.arange(300)),
                              (probabilities[300:], labels[300:], images, np.arange(300, 400)), list("abcd"),
                              method="aps", alpha=0.1, mondrian=True, seed=seed, calibration_split=calibration_split,
                              evaluated_split="test")


def test_reusing_val_is_reported_as_approximate_and_sets_are_deterministic_by_seed():
    section, fitted, sets = _evaluate("val")
    assert section["approximate"] and "approximate" in section["guarantee"] and fitted["calibration_split"] == "val"
    assert set(section) >= {"alpha", "method", "calibration_split", "coverage", "coverage_per_class",
                            "mean_set_size", "singleton_rate", "empty_rate"}
    held_out, _, same = _evaluate("calibration")
    assert not held_out["approximate"] and "approximate" not in held_out["guarantee"]
    assert (same == sets).all()  # same images, same seed: the same randomised sets
    assert not (_evaluate("calibration", seed=1)[2] == sets).all()


def test_compare_shows_each_runs_coverage_and_mean_set_size(tmp_path, capsys):
    import json

    from jaxmed import compare
    from jaxmed.config import base_config
    from jaxmed.evaluate.report import write_predictions

    rng = np.random.default_rng(0)
    probabilities, labels = _simulated(60, rng)
    for name, coverage in (("a", 0.95), ("b", 0.9)):
        workdir = tmp_path / name
        (workdir / "eval/test").mkdir(parents=True)
        (workdir / "config.json").write_text(base_config().to_json_best_effort())
        write_predictions(workdir / "eval/test/predictions.csv", [f"{i}.png" for i in range(60)], labels,
                          probabilities, list("abcd"), prediction_sets=["a|b"] * 60)
        (workdir / "eval/test/report.json").write_text(json.dumps({"conformal": {
            "method": "aps", "alpha": 0.05, "mondrian": True, "calibration_split": "calibration",
            "coverage": {"value": coverage, "ci95": [coverage - 0.05, 0.99], "count": 60}, "mean_set_size": 1.5}}))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out"),
                         "--bootstrap", "20"]) == 0
    table = (tmp_path / "out/comparison.md").read_text()
    assert "| conformal coverage | 0.9500 (0.9000–0.9900) (aps, α = 0.05) | 0.9000 (0.8500–0.9900)" in table
    assert "| mean set size | 1.50 | 1.50 |" in table
    page = (tmp_path / "out/comparison.html").read_text()
    assert 'data-key="runs.1.conformal.coverage.value"' in page
