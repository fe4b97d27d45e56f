"""95% intervals that stay honest at 0 and 1, for small classes, and when images cluster within patients.

A percentile bootstrap of a proportion has zero width whenever every image is right (accuracy 1.0 [1.0–1.0] on 200
images, where the exact interval is 0.982–1), so proportions get closed-form score or exact intervals
(`proportion_interval`). Statistics with no closed form (κ, F1, AUC) keep the bootstrap, BCa where it is defined.
When images share a patient (`data.group_pattern`), they are not independent: the bootstrap resamples patients
(`bootstrap_interval(groups=...)`), and a proportion's interval uses the effective sample size n / design effect
(Korn & Graubard 1998), the design effect measured from the patients' own spread. Every interval comes with a
record of its method and the unit resampled, so a report can say which made each number.
Outputs are plain floats, lists, strings and None (JSON-serialisable).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

ALPHA = 0.05
PROPORTION_METHODS = {"wilson": "Wilson score", "clopper-pearson": "Clopper–Pearson exact"}
_STATSMODELS_NAME = {"wilson": "wilson", "clopper-pearson": "beta"}
BCA_MAX_UNITS = 10_000  # above this many images/patients, the percentile bootstrap (BCa's jackknife is O(units²))
# Rows of resampled weights evaluated at once (bounded memory for large test sets).
_CHUNK_ELEMENTS = 4_000_000


def group_codes(groups, n: int) -> tuple[np.ndarray, str]:
    """Each image's unit (0 … units − 1) and the unit's name: its patient with groups, else the image itself."""
    if groups is None:
        return np.arange(n), "image"
    groups = np.asarray(groups, dtype=object)
    if groups.shape != (n,):
        raise ValueError(f"groups must give one patient id per image ({n}); got shape {groups.shape}")
    return np.unique(groups.astype(str), return_inverse=True)[1].reshape(-1), "patient"


def proportion_interval(k, n, method: str = "wilson", *, design_effect: float = 1.0) -> list[float] | None:
    """The 95% interval of k successes in n (None for n = 0), on an effective sample of n / design_effect."""
    if method not in PROPORTION_METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(PROPORTION_METHODS)}")
    if n <= 0:
        return None
    scale = max(float(design_effect), 1.0)
    low, high = proportion_confint(k / scale, n / scale, alpha=ALPHA, method=_STATSMODELS_NAME[method])
    return [float(max(low, 0.0)), float(min(high, 1.0))]


def design_effect(successes, codes) -> float:
    """Var(p̂) with patients as clusters (the ratio estimator's) over the binomial Var(p̂); 1 if not estimable.

    Floored at 1, as Korn & Graubard do, so a lucky spread never makes an interval narrower than independence.
    One patient only: every image is one observation, so the design effect is n.
    """
    successes = np.asarray(successes, np.float64)
    n = len(successes)
    units, codes = np.unique(codes, return_inverse=True)
    if n == 0:
        return 1.0
    if len(units) == 1:
        return float(n)
    p = successes.mean()
    if p in (0.0, 1.0):
        return 1.0
    per_unit = np.bincount(codes, weights=successes - p)
    clustered = len(units) / (len(units) - 1) * np.sum(per_unit ** 2) / n ** 2
    return max(1.0, float(clustered / (p * (1 - p) / n)))


def proportion_entry(successes, groups_of=None, method: str = "wilson") -> dict:
    """{"value", "ci95", "k", "n", "method", "unit"} of a 0/1 array; None values when it is empty."""
    successes = np.asarray(successes, bool)
    n, k = int(len(successes)), int(successes.sum())
    text = PROPORTION_METHODS[method]
    if groups_of is None:
        return {"value": k / n if n else None, "ci95": proportion_interval(k, n, method), "k": k, "n": n,
                "method": text, "unit": "image"}
    effect = design_effect(successes, groups_of) if n else 1.0
    return {"value": k / n if n else None, "ci95": proportion_interval(k, n, method, design_effect=effect),
            "k": k, "n": n, "method": f"{text}, effective n = n / design effect {effect:.2f} (patients as clusters)",
            "unit": "patient"}


def unit_weights(draws, codes: np.ndarray, units: int) -> np.ndarray:
    """(rows, units) drawn unit indices → (rows, images) how often each image is in the resample."""
    draws = np.atleast_2d(np.asarray(draws, np.int64))
    rows = len(draws)
    counts = np.bincount((draws + np.arange(rows)[:, None] * units).ravel(), minlength=rows * units)
    return counts.reshape(rows, units)[:, codes].astype(np.float64)


def bootstrap_interval(statistic, n: int, *, groups=None, resamples: int = 1000, seed: int = 0,
                       method: str = "BCa") -> dict:
    """A 95% bootstrap interval of `statistic(weights)` with images (or, given groups, patients) resampled.

    `statistic` maps (rows, n) image multiplicities to (rows,) values, NaN where the metric is undefined.
    scipy.stats.bootstrap draws the units and makes the BCa interval (its jackknife leaves out one unit at a time,
    a whole patient with groups). Where BCa is undefined (every resample equal, or the metric undefined in some
    resamples), the percentile interval of the defined resamples is given instead and `note` says why.
    → {"ci95", "method", "unit", "resamples", "note"}.
    """
    codes, unit = group_codes(groups, n)
    units = int(codes.max()) + 1 if n else 0
    result = {"ci95": None, "method": f"{method} bootstrap", "unit": unit, "resamples": int(resamples), "note": None}
    if units < 2 or resamples < 1:
        result["note"] = f"fewer than two {unit}s: nothing to resample"
        return result

    def on_units(drawn, axis=-1):
        drawn = np.moveaxis(np.asarray(drawn), axis, -1)
        flat = drawn.reshape(-1, drawn.shape[-1])
        values = np.concatenate([statistic(unit_weights(flat[i:i + chunk], codes, units))
                                 for i in range(0, len(flat), chunk)])
        return values.reshape(drawn.shape[:-1])

    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    if method == "BCa" and units > BCA_MAX_UNITS:  # its jackknife evaluates the statistic once per unit
        method = "percentile"
        result.update(method="percentile bootstrap", note=f"BCa's jackknife over {units} {unit}s is too costly "
                      f"(limit {BCA_MAX_UNITS}); percentile interval")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        fit = stats.bootstrap((np.arange(units),), on_units, n_resamples=resamples, batch=chunk, vectorized=True,
                              method="BCa" if method == "BCa" else "percentile", confidence_level=1 - ALPHA,
                              rng=np.random.default_rng(seed))
    low, high = fit.confidence_interval
    draws = np.asarray(fit.bootstrap_distribution, np.float64)
    if np.isfinite(low) and np.isfinite(high):
        result["ci95"] = [float(low), float(high)]
        return result
    defined = draws[~np.isnan(draws)]
    if not len(defined):
        result.update(method="bootstrap", note="the metric is undefined in every resample")
        return result
    if len(defined) < len(draws):
        reason = f"the metric is undefined in {len(draws) - len(defined)} of {len(draws)} resamples"
    elif np.ptp(defined) == 0:
        reason = "every resample gave the same value"
    else:
        reason = "the BCa acceleration or bias correction is not finite"
    lower, upper = np.percentile(defined, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    result.update(ci95=[float(lower), float(upper)], method="percentile bootstrap",
                  note=f"BCa not possible ({reason}); percentile interval of the defined resamples")
    return result


def bootstrap_pvalue(differences) -> float | None:
    """Two-sided p of "no difference" that agrees with the percentile interval: 2 · min(P(Δ* ≤ 0), P(Δ* ≥ 0)).

    The percentile 95% interval excludes 0 exactly when this p < 0.05 (up to ties at 0), by construction.
    """
    differences = np.asarray(differences, np.float64)
    differences = differences[~np.isnan(differences)]
    if not len(differences):
        return None
    return float(min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0))))


def paired_proportion_difference(b: int, c: int, n: int) -> list[float] | None:
    """A 95% interval of accuracy(A) − accuracy(B) = (b − c) / n that agrees with the exact McNemar test.

    Given the d = b + c discordant images, b ~ Binomial(d, π) and the difference is ψ(2π − 1), ψ the discordance
    rate. π gets its Clopper–Pearson interval, the inversion of the same doubled-tail binomial test McNemar's exact
    p is, so the interval excludes 0 exactly when p < 0.05. ψ gets a 99% Clopper–Pearson interval and each end
    takes the ψ that widens it, so a handful of discordant images (or none) still gives an interval of honest
    width instead of collapsing to (b − c) / n.
    """
    if n <= 0:
        return None
    d = b + c
    pi_low, pi_high = (0.0, 1.0) if d == 0 else proportion_confint(b, d, alpha=ALPHA, method="beta")
    psi_low, psi_high = proportion_confint(d, n, alpha=0.01, method="beta")

    def widest(shift, lowest):
        candidates = [psi * (2 * shift - 1) for psi in (psi_low, psi_high)]
        return min(candidates) if lowest else max(candidates)

    return [float(widest(pi_low, True)), float(widest(pi_high, False))]


