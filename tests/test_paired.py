"""Paired comparison of two models: McNemar against the binomial test, the paired bootstrap against sklearn on
explicit resamples, fast DeLong against a textbook O(m·n) version, a hand example and the bootstrap SE."""

import time

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jaxmed.evaluate import paired


def _probabilities(rng, labels, num_classes, signal, ties=False):
    logits = rng.normal(size=(len(labels), num_classes))
    logits[np.arange(len(labels)), labels] += signal
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if ties:  # coarse scores: many exact ties within and across classes
        probabilities = np.round(probabilities, 1) + 1e-3
        probabilities /= probabilities.sum(1, keepdims=True)
    return probabilities


def _correlated_binary(rng, n, shift_a=1.0, shift_b=0.7, rho=0.6, round_to=None):
    labels = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    scores = [shift * labels + np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=n)
              for shift in (shift_a, shift_b)]
    if round_to is not None:
        scores = [np.round(s, round_to) for s in scores]
    return labels, scores[0], scores[1]


@pytest.mark.parametrize("seed, flip", [(0, 0.05), (1, 0.2), (2, 0.5)])
def test_mcnemar_table_and_exact_pvalue_match_the_binomial_test(seed, flip):
    rng = np.random.default_rng(seed)
    correct_a = rng.random(300) < 0.8
    correct_b = np.where(rng.random(300) < flip, ~correct_a, correct_a)
    result = paired.mcnemar_exact(correct_a, correct_b)
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    assert (result["b"], result["c"]) == (b, c)
    assert sum(map(sum, result["table"])) == 300 and result["table"][0][0] == int(np.sum(correct_a & correct_b))
    assert result["pvalue"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert result["difference"] == pytest.approx(correct_a.mean() - correct_b.mean())


def test_mcnemar_identical_models_give_p_one_and_a_dominating_model_a_tiny_p():
    correct = np.random.default_rng(0).random(200) < 0.7
    assert paired.mcnemar_exact(correct, correct)["pvalue"] == 1.0
    better = correct.copy()
    better[np.flatnonzero(~correct)[:40]] = True  # A is right on 40 images B gets wrong, never the reverse
    result = paired.mcnemar_exact(better.astype(int), correct.astype(int))
    assert (result["b"], result["c"]) == (40, 0)
    assert result["pvalue"] == pytest.approx(2 * 0.5 ** 40)


def test_mcnemar_rejects_mismatched_or_non_boolean_inputs():
    with pytest.raises(ValueError, match="same images"):
        paired.mcnemar_exact([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="True/False"):
        paired.mcnemar_exact([1, 2, 0], [1, 0, 0])


@pytest.mark.parametrize("num_classes", [2, 4])
def test_bootstrap_point_values_match_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 400)
    pa, pb = (_probabilities(rng, labels, num_classes, s, ties=True) for s in (1.5, 1.0))
    result = paired.paired_bootstrap(labels, pa, pb, resamples=50)
    for key, p in (("a", pa), ("b", pb)):
        predictions = p.argmax(1)
        auc = (skm.roc_auc_score(labels, p[:, 1]) if num_classes == 2
               else skm.roc_auc_score(labels, p, multi_class="ovr"))
        assert result["accuracy"][key] == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
        assert result["balanced_accuracy"][key] == pytest.approx(skm.balanced_accuracy_score(labels, predictions),
                                                                 abs=1e-12)
        assert result["roc_auc_macro"][key] == pytest.approx(auc, abs=1e-12)
    for name in ("accuracy", "balanced_accuracy", "roc_auc_macro"):
        entry = result[name]
        assert entry["difference"] == pytest.approx(entry["a"] - entry["b"])
        assert entry["ci95"][0] <= entry["difference"] <= entry["ci95"][1]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_resample_weights_give_sklearn_metrics_of_the_explicit_resample():
    """Multiplicity weights reproduce sklearn on labels[idx]; a class missing from the resample leaves the macro."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 150)
    p = _probabilities(rng, labels, 3, 1.0, ties=True)
    prepared = [paired._rank_prepare(p[:, k], labels == k) for k in range(3)]
    correct = (p.argmax(1) == labels).astype(float)
    for idx in (rng.integers(0, 150, 150), rng.choice(np.flatnonzero(labels != 2), 150)):
        weights = np.bincount(idx, minlength=150)[None].astype(float)
        got = paired._weighted_metrics(weights, labels, 3, correct, prepared)
        y, q = labels[idx], p[idx]
        present = [k for k in range(3) if 0 < np.sum(y == k) < len(y)]
        macro = np.mean([skm.roc_auc_score(y == k, q[:, k]) for k in present])
        assert got["roc_auc_macro"][0] == pytest.approx(macro, abs=1e-12)
        assert got["accuracy"][0] == pytest.approx(skm.accuracy_score(y, q.argmax(1)), abs=1e-12)
        assert got["balanced_accuracy"][0] == pytest.approx(skm.balanced_accuracy_score(y, q.argmax(1)), abs=1e-12)


def test_bootstrap_resamples_the_same_images_for_both_models():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    pa = _probabilities(rng, labels, 3, 1.0)
    same = paired.paired_bootstrap(labels, pa, pa.copy(), resamples=200)
    for name in ("accuracy", "balanced_accuracy", "roc_auc_macro"):
        assert same[name]["ci95"] == [0.0, 0.0] and same[name]["se"] == 0.0
    # B differs from A on a few images only: the paired interval is far narrower than either model's own spread.
    pb = pa.copy()
    pb[:15] = pb[:15, ::-1]
    near = paired.paired_bootstrap(labels, pa, pb, resamples=200)
    width = near["accuracy"]["ci95"][1] - near["accuracy"]["ci95"][0]
    own_width = 2 * 1.96 * np.sqrt(near["accuracy"]["a"] * (1 - near["accuracy"]["a"]) / 300)
    assert 0 < width < own_width / 2
    assert paired.paired_bootstrap(labels, pa, pb, resamples=200) == near
    assert paired.paired_bootstrap(labels, pa, pb, resamples=200, seed=1) != near


def test_bootstrap_1000_resamples_of_1000_images_takes_seconds():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 1000)
    pa, pb = (_probabilities(rng, labels, 4, s) for s in (1.5, 1.2))
    start = time.perf_counter()
    paired.paired_bootstrap(labels, pa, pb, resamples=1000)
    assert time.perf_counter() - start < 10


def test_bootstrap_rejects_mismatched_inputs():
    labels = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="same images"):
        paired.paired_bootstrap(labels, np.full((3, 2), 0.5), np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="labels must have shape"):
        paired.paired_bootstrap(labels[:2], np.full((3, 2), 0.5), np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="integers in"):
        paired.paired_bootstrap(np.array([0, 1, 2]), np.full((3, 2), 0.5), np.full((3, 2), 0.5))


@pytest.mark.parametrize("seed, n, round_to", [(0, 60, 1), (1, 200, 1), (2, 301, 0), (3, 500, None)])
def test_fast_delong_equals_the_textbook_version_with_ties(seed, n, round_to):
    labels, a, b = _correlated_binary(np.random.default_rng(seed), n, round_to=round_to)
    if seed == 2:
        labels = (np.random.default_rng(9).random(n) < 0.15).astype(int)  # unbalanced classes
    fast, slow = paired.delong(labels, a, b), paired.delong_slow(labels, a, b)
    assert fast.keys() == slow.keys()
    for key in ("auc_a", "auc_b", "difference", "se", "z", "pvalue"):
        assert abs(fast[key] - slow[key]) < 1e-8, key
    assert np.allclose(fast["ci95"], slow["ci95"], rtol=0, atol=1e-8)
    assert fast["auc_a"] == pytest.approx(skm.roc_auc_score(labels, a), abs=1e-12)
    assert fast["auc_b"] == pytest.approx(skm.roc_auc_score(labels, b), abs=1e-12)


@pytest.mark.parametrize("implementation", [paired.delong, paired.delong_slow])
def test_delong_hand_example(implementation):
    # Positives score (3, 2) and (2, 1), negatives (2, 1) and (3, 1) under A and B; ties count ½.
    # AUC_A = (1 + 1 + ½ + 1)/4, AUC_B = (0 + 1 + 0 + ½)/4. V10 differences (½, ½) have no spread; V01
    # differences (¾, ¼) have variance 1/8, so Var = 0/2 + (1/8)/2 = 1/16 and z = ½ / ¼ = 2.
    result = implementation([1, 1, 0, 0], [3, 2, 2, 1], [2, 1, 3, 1])
    assert result["auc_a"] == pytest.approx(0.875) and result["auc_b"] == pytest.approx(0.375)
    assert result["se"] == pytest.approx(0.25) and result["z"] == pytest.approx(2.0)
    assert result["pvalue"] == pytest.approx(0.0455002638963584)


@pytest.mark.parametrize("implementation", [paired.delong, paired.delong_slow])
def test_delong_identical_rankings_give_zero_difference_and_p_one(implementation):
    labels, a, _ = _correlated_binary(np.random.default_rng(0), 100, round_to=1)
    for b in (a.copy(), 3 * a + 1):  # the same scores, and a monotone transform with the same ranks
        result = implementation(labels, a, b)
        assert result["difference"] == 0 and result["se"] == 0
        assert result["z"] == 0 and result["pvalue"] == 1.0 and result["ci95"] == [0.0, 0.0]


def test_delong_se_agrees_with_the_paired_bootstrap_on_correlated_scores():
    labels, a, b = _correlated_binary(np.random.default_rng(4), 600, rho=0.6)
    result = paired.delong(labels, a, b)

    def as_probabilities(s):
        positive = 1 / (1 + np.exp(-s))  # monotone: the same AUC as the raw score
        return np.stack([1 - positive, positive], 1)

    boot = paired.paired_bootstrap(labels, as_probabilities(a), as_probabilities(b), resamples=2000, seed=1)
    assert boot["roc_auc_macro"]["difference"] == pytest.approx(result["difference"], abs=1e-12)
    assert 0.85 < result["se"] / boot["roc_auc_macro"]["se"] < 1.15
    low, high = boot["roc_auc_macro"]["ci95"]  # a 95% percentile interval of a near-normal statistic: ±1.96 SE
    assert 0.92 < (high - low) / (2 * 1.96 * boot["roc_auc_macro"]["se"]) < 1.08
    assert result["pvalue"] < 0.05 and result["ci95"][0] > 0  # shifts 1.0 vs 0.7 on 600 images: detectable


def test_delong_rejects_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        paired.delong([0, 1, 2, 1, 0], np.arange(5.0), np.arange(5.0))
    with pytest.raises(ValueError, match="same length"):
        paired.delong([0, 1, 1, 0], np.arange(4.0), np.arange(5.0))
    with pytest.raises(ValueError, match="one score per image"):
        paired.delong([0, 1, 1, 0], np.ones((4, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="two positives"):
        paired.delong([0, 1, 0, 0], np.arange(4.0), np.arange(4.0))


def test_verdict_sentences():
    assert (paired.verdict("A", "B", 1.23, [-0.42, 2.9], 0.21, 1000)
            == "A − B accuracy +1.2 pp [−0.4, +2.9], McNemar p = 0.21: no evidence of a difference on 1000 images")
    assert (paired.verdict("ViT", "ResNet", 2.0, [0.7, 3.3], 0.003, 500) == "ViT − ResNet accuracy +2.0 pp "
            "[+0.7, +3.3], McNemar p = 0.003: ViT is better (p = 0.003) on 500 images")
    text = paired.verdict("A", "B", -3.1, [-4.0, -2.2], 1e-6, 800, metric="ROC AUC", test="DeLong")
    assert text == "A − B ROC AUC −3.1 pp [−4.0, −2.2], DeLong p < 0.001: B is better (p < 0.001) on 800 images"
    # A positive difference with p above α is no evidence; near α enough digits are shown to see which side.
    assert paired.verdict("A", "B", 1.0, [0.0, 2.0], 0.051, 100).endswith("no evidence of a difference on 100 images")
    assert paired.format_pvalue(0.0496) == "p = 0.0496" and paired.format_pvalue(0.0504) == "p = 0.05"
    assert paired.format_pvalue(0.0005) == "p < 0.001" and paired.format_pvalue(0.001) == "p = 0.001"
