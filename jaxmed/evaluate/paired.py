"""Is model A better than model B on the same test images? Paired tests: exact McNemar, paired bootstrap, DeLong.

Two models scored on one test set make correlated errors (a hard image is hard for both), so comparing two separate
confidence intervals ignores the pairing and misses real differences. Every test here uses it: McNemar looks only at
the images where the models disagree, the bootstrap resamples the same image indices for both, and DeLong uses the
covariance of the two AUC estimates. Outputs are plain floats, ints, lists and None (JSON-serialisable).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from jaxmed.evaluate import intervals

ALPHA = 0.05
MCNEMAR_INTERVAL = ("exact conditional: Clopper–Pearson for the share of discordant images A gets right (the inversion "
                    "of the exact McNemar test), scaled by a 99% Clopper–Pearson range of the discordance rate")
_Z95 = float(stats.norm.ppf(0.975))
# A bootstrap chunk holds at most this many resampled indices, so a large test set stays in bounded memory.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def mcnemar_exact(correct_a, correct_b) -> dict:
    """The paired correct/incorrect table and the exact (binomial) McNemar p-value of "A and B are equally accurate".

    b counts images A gets right and B wrong, c the reverse; only those discordant images carry evidence.
    """
    correct_a, correct_b = _as_bool(correct_a, "correct_a"), _as_bool(correct_b, "correct_b")
    _check_same_length(correct_a, correct_b, "correct_a", "correct_b")
    both, b = int(np.sum(correct_a & correct_b)), int(np.sum(correct_a & ~correct_b))
    c, neither = int(np.sum(~correct_a & correct_b)), int(np.sum(~correct_a & ~correct_b))
    table = [[both, b], [c, neither]]
    # No discordant image: no evidence either way (statsmodels also gives 1 here; being explicit keeps it so).
    pvalue = 1.0 if b + c == 0 else float(mcnemar(table, exact=True).pvalue)
    n = len(correct_a)
    return {"num_examples": n, "table": table, "b": b, "c": c, "accuracy_a": (both + b) / n,
            "accuracy_b": (both + c) / n, "difference": (b - c) / n, "pvalue": pvalue,
            "ci95": intervals.paired_proportion_difference(b, c, n), "ci95_method": MCNEMAR_INTERVAL}


def paired_bootstrap(labels, probabilities_a, probabilities_b, *, resamples: int = 1000, seed: int = 0,
                     groups=None) -> dict:
    """Differences A − B in accuracy, balanced accuracy and macro ROC AUC, with percentile 95% intervals and SEs.

    Each resample draws image indices with replacement and scores both models on the SAME indices. Predictions are
    the arg-max. Macro AUC is one-vs-rest over the classes with both outcomes in the resample (binary: the AUC of
    class 1), computed from the multiplicities of the drawn images with a rank (Mann–Whitney) formula, so one
    argsort per class serves every resample. A resample where a metric is undefined is left out of its interval.
    With `groups` (a patient id per image) whole patients are resampled. Each difference carries the two-sided
    bootstrap p that agrees with its percentile interval (intervals.bootstrap_pvalue).
    """
    labels, probabilities_a, probabilities_b = _check_probabilities(labels, probabilities_a, probabilities_b)
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be at least 1")
    n, num_classes = probabilities_a.shape
    correct = [(p.argmax(-1) == labels).astype(np.float64) for p in (probabilities_a, probabilities_b)]
    scores = ([probabilities_a[:, 1:], probabilities_b[:, 1:]] if num_classes == 2
              else [probabilities_a, probabilities_b])
    classes = [1] if num_classes == 2 else list(range(num_classes))
    prepared = [[_rank_prepare(s[:, j], labels == k) for j, k in enumerate(classes)] for s in scores]

    codes, unit = intervals.group_codes(groups, n)
    draws = {name: [] for name in ("accuracy", "balanced_accuracy", "roc_auc_macro")}
    for weights in resampled_weights(codes, resamples, seed):
        results = [_weighted_metrics(weights, labels, num_classes, correct[m], prepared[m]) for m in (0, 1)]
        for name in draws:
            draws[name].append(results[0][name] - results[1][name])
    ones = np.ones((1, n))
    points = [_weighted_metrics(ones, labels, num_classes, correct[m], prepared[m]) for m in (0, 1)]
    report = {"num_examples": n, "resamples": int(resamples), "seed": int(seed), "unit": unit,
              "method": "percentile bootstrap of the paired difference"}
    for name, chunks in draws.items():
        a, b = (_nullable(p[name][0]) for p in points)
        values = np.concatenate(chunks)
        values = values[~np.isnan(values)]
        report[name] = {"a": a, "b": b, "difference": None if a is None or b is None else a - b,
                        "ci95": _percentile_interval(values),
                        "se": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        "pvalue": intervals.bootstrap_pvalue(values)}
    return report


def resampled_weights(codes: np.ndarray, resamples: int, seed: int):
    """Chunks of (rows, images) multiplicities, units (images, or patients via `codes`) drawn with replacement.

    Every caller with the same codes and seed sees the very same resamples (compare scores each run and each
    pair on them). Without groups a unit is an image, and the draws are those of plain image resampling.
    """
    rng = np.random.default_rng(seed)
    units = int(codes.max()) + 1
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(units, len(codes)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        yield intervals.unit_weights(rng.integers(0, units, size=(size, units)), codes, units)


def delong(labels, scores_a, scores_b) -> dict:
    """DeLong's test of AUC(A) = AUC(B) on one binary test set, by Sun & Xu's (2014) midrank algorithm, O(N log N).

    With m positives X and n negatives Y, the structural components are V10(X_i) = P(Y < X_i) + ½P(Y = X_i) and
    V01(Y_j) = P(X > Y_j) + ½P(X = Y_j); both follow from midranks, and the covariance of the two AUCs is
    S10/m + S01/n. Scores must rank positives high (class 1 = positive).
    """
    labels, scores = _check_binary(labels, scores_a, scores_b)
    positive = labels == 1
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    combined = np.concatenate([x, y], axis=1)
    ranks_xy = np.stack([_midranks(row) for row in combined])
    ranks_x = np.stack([_midranks(row) for row in x])
    ranks_y = np.stack([_midranks(row) for row in y])
    auc = (ranks_xy[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v10 = (ranks_xy[:, :m] - ranks_x) / n  # (2, m): fraction of negatives each positive beats
    v01 = 1.0 - (ranks_xy[:, m:] - ranks_y) / m  # (2, n): fraction of positives beating each negative
    covariance = np.cov(v10) / m + np.cov(v01) / n
    contrast = np.array([1.0, -1.0])
    return _delong_result(auc, float(contrast @ covariance @ contrast), m, n)


def delong_slow(labels, scores_a, scores_b) -> dict:
    """Textbook DeLong with explicit placement values ψ over all m·n pairs; a reference for tests, not for use."""
    labels, scores = _check_binary(labels, scores_a, scores_b)
    aucs, v10s, v01s = [], [], []
    for s in scores:
        x, y = s[labels == 1], s[labels == 0]
        psi = np.where(x[:, None] > y[None, :], 1.0, np.where(x[:, None] == y[None, :], 0.5, 0.0))
        v10s.append(psi.mean(1))
        v01s.append(psi.mean(0))
        aucs.append(psi.mean())
    m, n = len(v10s[0]), len(v01s[0])

    def cov(u, v):
        return float(np.sum((u - u.mean()) * (v - v.mean())) / (len(u) - 1))

    s10 = [[cov(v10s[r], v10s[s]) for s in (0, 1)] for r in (0, 1)]
    s01 = [[cov(v01s[r], v01s[s]) for s in (0, 1)] for r in (0, 1)]
    variance = sum(sign * (s10[r][s] / m + s01[r][s] / n)
                   for r, s, sign in ((0, 0, 1), (1, 1, 1), (0, 1, -2)))
    return _delong_result(np.array(aucs), variance, m, n)


def holm(tests: list[dict]) -> None:
    """Sets each test's "adjusted_pvalue" (Holm over the tests that have a p; None for those without)."""
    tested = [test for test in tests if test["pvalue"] is not None]
    for test in tests:
        test["adjusted_pvalue"] = None
    if tested:
        adjusted = multipletests([test["pvalue"] for test in tested], alpha=ALPHA, method="holm")[1]
        for test, value in zip(tested, adjusted):
            test["adjusted_pvalue"] = float(value)


def verdict(name_a: str, name_b: str, difference_pp, ci_pp, pvalue, n: int, metric: str = "accuracy",
            test: str = "McNemar", *, adjusted=None, reason: str | None = None) -> str:
    """One plain-language sentence: the difference in percentage points, its interval, the p-value and the call.

    `adjusted` (p after Holm's adjustment for the other pairs) decides the call when given. Where the interval and
    the deciding p disagree about 0 (an adjusted p, or a test not built with the interval), the sentence says so.
    """
    interval = "[n/a]" if ci_pp is None else f"[{_signed(ci_pp[0])}, {_signed(ci_pp[1])}]"
    difference = "n/a" if difference_pp is None else _signed(difference_pp)
    deciding = pvalue if adjusted is None else adjusted
    shown = format_pvalue(pvalue) + ("" if adjusted is None else f" (Holm-adjusted {format_pvalue(adjusted)[2:]})")
    head = f"{name_a} − {name_b} {metric} {difference} pp {interval}, {test} {shown}"
    if deciding is None or difference_pp is None:
        call = "no test possible" + (f" ({reason})" if reason else "")
    elif deciding < ALPHA and difference_pp != 0:
        call = f"{name_a if difference_pp > 0 else name_b} is better ({format_pvalue(deciding)})"
    else:
        call = "no evidence of a difference"
    if deciding is not None and ci_pp is not None and (ci_pp[0] > 0 or ci_pp[1] < 0) != (deciding < ALPHA):
        excludes = "excludes" if ci_pp[0] > 0 or ci_pp[1] < 0 else "includes"
        why = "it is not adjusted for the other pairs" if adjusted is not None else f"it is not {test}'s inversion"
        call += f" (the 95% interval {excludes} 0: {why}; the call follows the test)"
    return f"{head}: {call} on {n} images"


def bootstrap_test(entry: dict, replaced: str) -> dict:
    """The deciding test of a pair whose images share patients: the patient-level paired bootstrap (p and interval
    agree by construction), in place of `replaced`, which assumes independent images."""
    return {"test": "patient bootstrap", "pvalue": entry["pvalue"], "difference": entry["difference"],
            "ci95": entry["ci95"], "method": "percentile bootstrap of the paired difference, patients resampled",
            "unit": "patient", "note": f"{replaced} assumes independent images; these are grouped by patient"}


def pair_verdicts(pair: dict, class_names: list[str]) -> None:
    """The plain-language lines, from each deciding test (Holm-adjusted p when there are more than two runs)."""
    for key, out, metric in (("accuracy_test", "verdict", "accuracy"),
                             ("auc_test", "auc_verdict", f"ROC AUC ({class_names[-1]})")):
        test = pair.get(key)
        if test:
            interval = None if test["ci95"] is None else [100 * v for v in test["ci95"]]
            difference = None if test["difference"] is None else 100 * test["difference"]
            pair[out] = verdict(pair["a"], pair["b"], difference, interval, test["pvalue"], pair["num_examples"],
                                metric=metric, test=test["test"], adjusted=test.get("adjusted_pvalue"),
                                reason=test.get("reason"))


def format_pvalue(pvalue) -> str:
    """'p = 0.21', 'p = 0.003', 'p < 0.001'; enough digits that the printed value is on the same side of α."""
    if pvalue is None:
        return "p n/a"
    if pvalue < 0.001:
        return "p < 0.001"
    for digits in range(2, 8):
        text = f"{pvalue:.{digits}g}"
        if (float(text) < ALPHA) == (pvalue < ALPHA):
            return f"p = {text}"
    return f"p = {pvalue!r}"


def _delong_result(auc, variance: float, m: int, n: int) -> dict:
    difference = float(auc[0] - auc[1])
    se = math.sqrt(max(variance, 0.0))
    reason = None
    if se > 0:
        z = difference / se
        pvalue = float(2 * stats.norm.sf(abs(z)))
    elif difference == 0:  # identical rankings: no evidence either way (p = 1, not 0/0)
        z, pvalue = 0.0, 1.0
    else:
        # Unequal AUCs with no estimated spread (e.g. one model perfect, the other constant, on a few images): the
        # normal approximation has nothing to scale by, and p = 0 would claim certainty from 4 images.
        z, pvalue = None, None
        reason = (f"DeLong's variance estimate is 0 with {m} positives and {n} negatives: too few distinct cases "
                  "for its normal approximation")
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": difference, "se": se,
            "z": None if z is None else float(z), "pvalue": pvalue,
            "ci95": None if reason else [difference - _Z95 * se, difference + _Z95 * se], "num_positives": m,
            "num_negatives": n, "no_test_reason": reason}


def _midranks(values) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def _rank_prepare(score, is_class):
    """For one class: sort order, tie-group starts and positive mask in sorted order, shared by all resamples."""
    order = np.argsort(score, kind="mergesort")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    return order, starts, is_class[order].astype(np.float64)


def _weighted_auc(weights, prepared) -> np.ndarray:
    """AUC per row of image multiplicities: Σ_pos w·(negative weight below + ½ negative weight tied) / (P·N)."""
    order, starts, positive = prepared
    w = weights[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * (1.0 - positive), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total_pos > 0) & (total_neg > 0),
                        (pos * (below + 0.5 * neg)).sum(1) / (total_pos * total_neg), np.nan)


def _weighted_metrics(weights, labels, num_classes, correct, prepared) -> dict:
    """Accuracy, balanced accuracy (mean recall over present classes) and macro AUC per row of multiplicities."""
    one_hot = np.eye(num_classes)[labels]
    support, hits = weights @ one_hot, (weights * correct) @ one_hot
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = np.nanmean(np.where(support > 0, hits / support, np.nan), axis=1)
        aucs = np.stack([_weighted_auc(weights, p) for p in prepared], 1)
    defined = ~np.isnan(aucs)
    macro = np.where(defined.any(1), np.where(defined, aucs, 0.0).sum(1) / np.maximum(defined.sum(1), 1), np.nan)
    return {"accuracy": hits.sum(1) / support.sum(1), "balanced_accuracy": balanced, "roc_auc_macro": macro}


def _check_probabilities(labels, probabilities_a, probabilities_b):
    labels = np.asarray(labels)
    a, b = np.asarray(probabilities_a, dtype=np.float64), np.asarray(probabilities_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"probabilities_a and probabilities_b must both have shape (N, classes) for the same images;"
                         f" got {a.shape} and {b.shape}")
    if labels.ndim != 1 or len(labels) != len(a):
        raise ValueError(f"labels must have shape ({len(a)},) to match the probabilities; got {labels.shape}")
    if not len(labels) or a.shape[1] < 2:
        raise ValueError(f"need at least one image and two classes; got probabilities of shape {a.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= a.shape[1]:
        raise ValueError(f"labels must be integers in [0, {a.shape[1]}); got dtype {labels.dtype}")
    return labels.astype(np.int64), a, b


def _check_binary(labels, scores_a, scores_b):
    labels = np.asarray(labels)
    scores = [np.asarray(s, dtype=np.float64) for s in (scores_a, scores_b)]
    if any(s.ndim != 1 for s in scores):
        raise ValueError(f"DeLong needs one score per image (e.g. probabilities[:, 1]); got shapes "
                         f"{scores[0].shape} and {scores[1].shape}")
    if labels.ndim != 1 or not len(labels) == len(scores[0]) == len(scores[1]):
        raise ValueError(f"labels, scores_a and scores_b must have the same length; got {labels.shape}, "
                         f"{scores[0].shape}, {scores[1].shape}")
    if not np.all(np.isin(labels, [0, 1])) or labels.dtype.kind not in "biuf":
        raise ValueError(f"DeLong compares binary ROC AUCs: labels must be 0 (negative) or 1 (positive); got values "
                         f"{np.unique(labels)[:10].tolist()}")
    if not all(np.isfinite(s).all() for s in scores):
        raise ValueError("scores must be finite")
    positives = int(np.sum(labels == 1))
    if positives < 2 or len(labels) - positives < 2:
        raise ValueError(f"DeLong needs at least two positives and two negatives to estimate a variance; got "
                         f"{positives} positives and {len(labels) - positives} negatives")
    return labels.astype(np.int64), np.stack(scores)


def _as_bool(values, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"{name} must be a non-empty 1-D array of per-image correct (True/1) or wrong (False/0); "
                         f"got shape {values.shape}")
    if not np.all(np.isin(values, [0, 1])):
        raise ValueError(f"{name} must hold only True/False (or 1/0): whether each image was classified correctly")
    return values.astype(bool)


def _check_same_length(a, b, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must cover the same images; got lengths {len(a)} and {len(b)}")


def _signed(value: float) -> str:
    """'+1.2' / '−0.4' with a true minus sign, as in a typeset table."""
    text = f"{value:+.1f}"
    if text in ("+0.0", "-0.0"):
        return "0.0"
    return "−" + text[1:] if text.startswith("-") else text


def _percentile_interval(values) -> list[float] | None:
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _nullable(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
