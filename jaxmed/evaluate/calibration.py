"""Can the probabilities be trusted? Calibration errors, proper scores, temperature scaling, a reliability diagram.

A classifier can rank well and still be over-confident (fine-tuned networks usually are): "90% sure" should be right
90% of the time before a probability is shown to a clinician or thresholded. ECE/MCE measure the gap on the
top-label confidence; Brier and NLL are proper scores of the whole distribution. Temperature scaling (Guo et al.,
2017) fits one T on validation logits, which fixes confidence without changing any arg-max prediction.
Outputs are plain floats, ints, lists and None (JSON-serialisable).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from sklearn.metrics import brier_score_loss, log_loss

BINS = 15
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
_AT_BOUND = 1e-3  # a fitted log T this close to a bound counts as stopped there
_SUM_TOLERANCE = 1e-4  # float32 softmax rows sum to 1 within ~1e-6; anything further off is not probabilities
_DPI = 120


def reliability_bins(labels, probabilities, bins: int = BINS, adaptive: bool = False) -> dict:
    """Per-bin top-label confidence, accuracy and count; confidence and accuracy are None for an empty bin.

    Equal-width bins are (lower, upper] on [0, 1], as in Guo et al. and sklearn's calibration_curve. Adaptive bins
    hold equal numbers of images (sorted by confidence, split as np.array_split does); their lower/upper are the
    smallest and largest confidence inside.
    """
    labels, probabilities = _check_inputs(labels, probabilities)
    if bins < 1:
        raise ValueError(f"bins={bins} must be at least 1")
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == labels).astype(np.float64)
    if adaptive:
        bins = min(bins, len(labels))
        order = np.argsort(confidence, kind="mergesort")
        parts = np.array_split(order, bins)
        index = np.empty(len(labels), dtype=np.int64)
        index[order] = np.repeat(np.arange(bins), [len(part) for part in parts])
        lower = [float(confidence[part].min()) for part in parts]
        upper = [float(confidence[part].max()) for part in parts]
    else:
        edges = np.linspace(0.0, 1.0, bins + 1)
        # side="left" puts a confidence equal to an edge into the bin below it: bins are (lower, upper].
        index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
        lower, upper = edges[:-1].tolist(), edges[1:].tolist()
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"lower": lower, "upper": upper, "confidence": _nullable_list(mean_confidence),
            "accuracy": _nullable_list(accuracy), "count": count.tolist()}


def expected_calibration_error(labels, probabilities, bins: int = BINS, adaptive: bool = False) -> float:
    """Σ_bins (count / N) · |accuracy − confidence| of the top label."""
    gaps, counts = _gaps(reliability_bins(labels, probabilities, bins, adaptive))
    return float(np.sum(counts * gaps) / np.sum(counts))


def maximum_calibration_error(labels, probabilities, bins: int = BINS, adaptive: bool = False) -> float:
    """The largest |accuracy − confidence| over non-empty bins."""
    gaps, _ = _gaps(reliability_bins(labels, probabilities, bins, adaptive))
    return float(gaps.max())


def brier_score(labels, probabilities) -> float:
    """Mean over images of Σ_k (p_k − y_k)², Brier's (1950) original multi-class score, in [0, 2].

    Convention: this is sklearn's brier_score_loss(labels, probabilities, labels=range(K), scale_by_half=False)
    (sklearn >= 1.7). For two classes it is 2 × the usual binary Brier, brier_score_loss(labels, p[:, 1]): one
    number comparable across binary and multi-class tasks.
    """
    labels, probabilities = _check_inputs(labels, probabilities)
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def negative_log_likelihood(labels, probabilities) -> float:
    """Mean −log p(true class), natural log; sklearn clips p to [eps, 1 − eps] so a confident miss is finite."""
    labels, probabilities = _check_inputs(labels, probabilities)
    return float(log_loss(labels, probabilities, labels=list(range(probabilities.shape[1]))))


def calibration_metrics(labels, probabilities) -> dict:
    """Everything a report needs: ECE (15 equal-width and 15 equal-mass bins), MCE, Brier (and which), NLL, bins."""
    labels, probabilities = _check_inputs(labels, probabilities)
    return {
        "num_examples": int(len(labels)),
        "ece_15": expected_calibration_error(labels, probabilities, BINS),
        "ece_adaptive_15": expected_calibration_error(labels, probabilities, BINS, adaptive=True),
        "mce": maximum_calibration_error(labels, probabilities, BINS),
        **_brier(labels, probabilities),
        "nll": negative_log_likelihood(labels, probabilities),
        "bins": reliability_bins(labels, probabilities, BINS),
    }


def _brier(labels, probabilities) -> dict:
    """Binary tasks: the usual Brier of the positive class (class 1), in [0, 1]; else the multi-class sum, in [0, 2].

    The multi-class score of a two-class task is exactly twice the binary one, which readers would misread.
    """
    if probabilities.shape[1] == 2:
        return {"brier": float(brier_score_loss(labels == 1, probabilities[:, 1])),
                "brier_kind": "binary Brier (positive class: class 1)"}
    return {"brier": brier_score(labels, probabilities), "brier_kind": "multi-class Brier (sum over classes)"}


def choose_temperature(val_logits, val_labels) -> dict:
    """The temperature to apply, or T = 1 with the reason when a fit would not be honest.

    A validation set with no wrong predictions is best fitted by T → 0 (every probability pushed to 1), and a fit
    that stops at its search bound is no minimum at all: applied to test, either makes every mistake look certain.
    → {"temperature", "applied", "reason", "fitted"}: `fitted` is the optimiser's value, kept for the record.
    """
    logits = _check_logits(val_logits)
    labels = np.asarray(val_labels)
    fitted = fit_temperature(logits, labels)
    errors = int(np.sum(logits.argmax(1) != labels))
    reason = None
    if errors == 0:
        reason = (f"validation has no misclassified image (0 of {len(labels)}): its NLL falls as T → 0, so no "
                  "temperature can be fitted")
    elif min(abs(math.log(fitted) - bound) for bound in _LOG_T_BOUNDS) < _AT_BOUND:
        reason = (f"the fit stopped at its search bound (T = {fitted:.4g}, bounds "
                  f"{math.exp(_LOG_T_BOUNDS[0]):g}–{math.exp(_LOG_T_BOUNDS[1]):g}): no interior minimum")
    return {"temperature": 1.0 if reason else fitted, "applied": reason is None, "reason": reason,
            "fitted": fitted}


def fit_temperature(val_logits, val_labels) -> float:
    """The T > 0 minimising the validation NLL of softmax(logits / T), searched over log T in [log 0.05, log 20].

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded scalar search finds the global minimum.
    Fit on validation, never on the test split the calibration is reported on.
    """
    logits = _check_logits(val_logits)
    labels = np.asarray(val_labels)
    if labels.shape != (len(logits),) or not np.issubdtype(labels.dtype, np.integer) or not (
            0 <= labels.min() and labels.max() < logits.shape[1]):
        raise ValueError(f"val_labels must be {len(logits)} integers in [0, {logits.shape[1]}) to match val_logits "
                         f"{logits.shape}; got shape {labels.shape}, dtype {labels.dtype}")
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-np.mean(_log_softmax(logits / math.exp(log_t))[rows, labels]))

    result = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-7})
    return float(math.exp(result.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64; T = 1 skips the division, so it is exactly the plain float64 softmax."""
    logits = _check_logits(logits)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} must be a finite number > 0")
    if temperature != 1.0:
        logits = logits / temperature
    return softmax(logits, axis=-1)


def reliability_diagram(labels, probabilities, path, *, probabilities_after=None, bins: int = BINS,
                        title: str = "Reliability (top-label confidence)") -> None:
    """PNG: per-bin accuracy bars against confidence with the diagonal, ECE in the legend, bin counts below.

    `probabilities_after` (e.g. after temperature scaling, same images) is overlaid as a line with its own ECE.
    """
    before = reliability_bins(labels, probabilities, bins)
    fig = Figure(figsize=(6.5, 7.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower, width = np.asarray(before["lower"]), 1.0 / bins
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    accuracy = np.array([np.nan if a is None else a for a in before["accuracy"]])
    ece = expected_calibration_error(labels, probabilities, bins)
    name = "accuracy per bin" if probabilities_after is None else "before scaling"
    top.bar(lower, np.nan_to_num(accuracy), width=width, align="edge", color="#1f77b4", edgecolor="white",
            alpha=0.8, label=f"{name} (ECE {ece:.3f})")
    bottom.bar(lower, before["count"], width=width, align="edge", color="#1f77b4", alpha=0.8, label="before")
    if probabilities_after is not None:
        after = reliability_bins(labels, probabilities_after, bins)
        ece_after = expected_calibration_error(labels, probabilities_after, bins)
        points = [(c, a) for c, a in zip(after["confidence"], after["accuracy"]) if c is not None]
        top.plot(*zip(*points), marker="o", color="#d62728", label=f"after scaling (ECE {ece_after:.3f})")
        bottom.step(np.r_[lower, 1.0], np.r_[after["count"], after["count"][-1]], where="post", color="#d62728",
                    label="after")
        bottom.legend(loc="upper left", fontsize=8)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left")
    bottom.set(xlabel="confidence (top-label probability)", ylabel="images", xticks=np.linspace(0, 1, 6))
    _save(fig, path)


def _save(fig: Figure, path) -> None:
    """Write the PNG and release the figure's memory (there is no pyplot reference to close); local paths only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=_DPI, format="png")
    finally:
        fig.clear()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - logsumexp(logits, axis=-1, keepdims=True)


def _gaps(bins: dict) -> tuple[np.ndarray, np.ndarray]:
    filled = [(abs(a - c), n) for a, c, n in zip(bins["accuracy"], bins["confidence"], bins["count"]) if n]
    gaps, counts = zip(*filled)
    return np.array(gaps), np.array(counts, dtype=np.float64)


def _check_inputs(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.ndim != 1 or probabilities.ndim != 2 or len(labels) != len(probabilities):
        raise ValueError(f"expected labels of shape (N,) and probabilities of shape (N, classes); got "
                         f"{labels.shape} and {probabilities.shape}")
    if not len(labels) or probabilities.shape[1] < 2:
        raise ValueError(f"need at least one image and two classes; got probabilities of shape {probabilities.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(f"labels must be integers in [0, {probabilities.shape[1]}); got dtype {labels.dtype}, "
                         f"range [{labels.min()}, {labels.max()}]")
    if (not np.isfinite(probabilities).all() or probabilities.min() < 0
            or np.abs(probabilities.sum(1) - 1).max() > _SUM_TOLERANCE):
        raise ValueError("probabilities must be finite, non-negative and sum to 1 per image (pass softmax outputs, "
                         "or apply_temperature(logits, T), not logits)")
    return labels.astype(np.int64), probabilities


def _check_logits(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2 or not len(logits):
        raise ValueError(f"logits must have shape (N, classes) with at least two classes; got {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return logits


def _nullable_list(values) -> list:
    return [None if math.isnan(v) else float(v) for v in values]
