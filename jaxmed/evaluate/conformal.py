"""Conformal prediction sets: "the true class is in {glioma, meningioma} with 95% confidence", with a guarantee.

Split conformal (Vovk et al. 2005; Angelopoulos & Bates 2021): a nonconformity score of the true class on held-out
calibration images that chose nothing (not the checkpoint, not the temperature), the ceil((n+1)(1-alpha))-th
smallest of them as the threshold, and every class whose score on a new image is at most the threshold goes into its
set. For exchangeable images P(true class in set) >= 1 - alpha. Scores (all from the calibrated probabilities):
LAC 1 - p_y (Sadinle et al. 2019: smallest sets); APS, randomised (Romano et al. 2020: the probability mass above y
plus u·p_y, sets that grow with uncertainty); RAPS (Angelopoulos et al. 2021: APS plus lambda·(rank - k_reg)+, fewer
big sets). Mondrian (class-conditional, Vovk 2012) keeps one threshold per class from that class's calibration
images, so a rare class gets its 1 - alpha too, not only the average image. MAPIE and crepes are the test oracles.

The randomisation u of an image is a hash of its model-input pixels and the seed: the same image gets the same set
in every evaluation and prediction, whatever else is in the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.conformal")

METHODS = ("lac", "aps", "raps")
RAPS_LAMBDA = 0.01  # Angelopoulos et al.'s penalty per rank beyond k_reg (their ImageNet choice)
RAPS_K_REG = 1  # ranks below this are free: the top class is never penalised


def nonconformity(probabilities, method: str, uniforms=None) -> np.ndarray:
    """(N, classes) score of every candidate class; lower conforms better. `uniforms` (N,) in [0, 1) for APS/RAPS."""
    probabilities = np.asarray(probabilities, np.float64)
    if method not in METHODS:
        raise ValueError(f"conformal method {method!r} is not one of {METHODS}")
    if method == "lac":
        return 1.0 - probabilities
    uniforms = np.asarray(uniforms, np.float64).reshape(-1, 1)
    if uniforms.shape[0] != len(probabilities):
        raise ValueError(f"need one uniform per image: {uniforms.shape[0]} for {len(probabilities)} images")
    order = np.argsort(-probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, axis=1)
    mass_above = np.cumsum(ranked, axis=1) - ranked  # probability of the classes ranked before each one
    ranked_scores = mass_above + uniforms * ranked
    if method == "raps":
        rank = np.arange(1, probabilities.shape[1] + 1)
        ranked_scores = ranked_scores + RAPS_LAMBDA * np.maximum(rank - RAPS_K_REG, 0)
    scores = np.empty_like(ranked_scores)
    np.put_along_axis(scores, order, ranked_scores, axis=1)
    return scores


def finite_sample_quantile(scores, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest score; +inf when n is too small for it (the set then holds the class)."""
    scores = np.sort(np.asarray(scores, np.float64))
    rank = int(np.ceil((len(scores) + 1) * (1 - alpha)))  # MAPIE's formula, so both agree at the boundaries
    return math.inf if rank > len(scores) else float(scores[rank - 1])


def fit(probabilities, labels, *, method: str, alpha: float, mondrian: bool, uniforms=None) -> dict:
    """Thresholds from calibration images: {"method", "alpha", "mondrian", "thresholds": one per class (equal when
    marginal; None = +inf, every set holds that class), "calibration_counts"} (JSON-ready)."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, np.float64)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    true_scores = nonconformity(probabilities, method, uniforms)[np.arange(len(labels)), labels]
    classes = probabilities.shape[1]
    counts = np.bincount(labels, minlength=classes)
    if mondrian:
        thresholds = [finite_sample_quantile(true_scores[labels == c], alpha) for c in range(classes)]
    else:
        thresholds = [finite_sample_quantile(true_scores, alpha)] * classes
    return {"method": method, "alpha": float(alpha), "mondrian": bool(mondrian),
            "thresholds": [None if math.isinf(t) else t for t in thresholds],
            "calibration_counts": counts.tolist(),
            **({"raps_lambda": RAPS_LAMBDA, "raps_k_reg": RAPS_K_REG} if method == "raps" else {})}


def prediction_sets(probabilities, fitted: dict, uniforms=None) -> np.ndarray:
    """(N, classes) bool: class y is in an image's set when its score is at most y's threshold."""
    thresholds = np.asarray([math.inf if t is None else t for t in fitted["thresholds"]], np.float64)
    return nonconformity(probabilities, fitted["method"], uniforms) <= thresholds[None, :]


def image_digest(image) -> int:
    """A 64-bit hash of an image's model-input pixels (what u is drawn from)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(array.tobytes(), digest_size=8, person=str(array.shape).encode()[:16])
    return int.from_bytes(digest.digest(), "little")


def uniforms_for(digests, seed: int) -> np.ndarray:
    """u in [0, 1) per image, a function of (seed, the image's digest) alone."""
    return np.asarray([np.random.default_rng([int(seed) & 0xFFFFFFFF, int(digest)]).random() for digest in digests],
                      np.float64)


def set_labels(sets: np.ndarray, class_names) -> list[str]:
    """Each set as the class names joined by '|' ('' for an empty set), for predictions.csv."""
    return ["|".join(name for name, inside in zip(class_names, row) if inside) for row in sets]


def summary(labels, sets: np.ndarray, class_names) -> dict:
    """Coverage (overall and per class, each with its 95% Wilson interval), mean set size, singleton and empty rates."""
    from statsmodels.stats.proportion import proportion_confint

    labels, sets = np.asarray(labels), np.asarray(sets, bool)
    covered = sets[np.arange(len(labels)), labels]
    sizes = sets.sum(1)

    def rate(hits) -> dict:
        count = int(len(hits))
        if not count:
            return {"value": None, "ci95": None, "count": 0}
        low, high = proportion_confint(int(hits.sum()), count, alpha=0.05, method="wilson")
        return {"value": float(hits.mean()), "ci95": [float(low), float(high)], "count": count}

    return {"coverage": rate(covered),
            "coverage_per_class": {name: rate(covered[labels == c]) for c, name in enumerate(class_names)},
            "mean_set_size": float(sizes.mean()) if len(sizes) else None,
            "singleton_rate": float(np.mean(sizes == 1)) if len(sizes) else None,
            "empty_rate": float(np.mean(sizes == 0)) if len(sizes) else None,
            "set_size_counts": np.bincount(sizes, minlength=len(class_names) + 1).tolist()}


def set_size_histogram(size_counts, path, *, title: str = "Prediction set sizes") -> None:
    """PNG: how many images got a set of 0, 1, …, K classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots()
    axes.bar(np.arange(len(size_counts)), size_counts, color="#1f77b4")
    axes.set(xlabel="classes in the set", ylabel="images", title=title, xticks=np.arange(len(size_counts)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=120, format="png")
    finally:
        fig.clear()


def evaluate(calibration, evaluated, class_names, *, method: str, alpha: float, mondrian: bool, seed: int,
             calibration_split: str, evaluated_split: str) -> tuple[dict, dict, np.ndarray]:
    """(the report's `conformal` section, the fitted thresholds to store with the run, the evaluated split's sets).

    `calibration` and `evaluated`: (calibrated probabilities, labels, images, row indices into images) of the split
    the thresholds are fitted on and of the split they are measured on; images give APS/RAPS their u."""
    def uniforms(images, indices):
        return None if method == "lac" else uniforms_for([image_digest(images[i]) for i in indices], seed)

    probabilities, labels, images, indices = calibration
    fitted = fit(probabilities, labels, method=method, alpha=alpha, mondrian=mondrian,
                 uniforms=uniforms(images, indices))
    fitted.update(calibration_split=calibration_split, seed=int(seed), class_names=list(class_names))
    probabilities, labels, images, indices = evaluated
    sets = prediction_sets(probabilities, fitted, uniforms(images, indices))
    held_out = calibration_split == "calibration"
    guarantee = (f"split conformal: for images exchangeable with the {calibration_split} split, P(true class in "
                 f"set) >= {1 - alpha:g}" + (" for every class" if mondrian else " on average over images"))
    if not held_out:
        guarantee += (f" — approximate: {calibration_split} also chose the checkpoint and the temperature; set "
                      "data.calibration_fraction > 0 for calibration images that chose nothing")
    always = [name for name, threshold in zip(class_names, fitted["thresholds"]) if threshold is None]
    if always:  # honest but uninformative: say so rather than let the mean set size speak alone
        guarantee += (f"; {', '.join(always)}: too few {calibration_split} images for a {1 - alpha:g} quantile "
                      f"(fewer than {math.ceil((1 - alpha) / alpha)}), so every set holds "
                      f"{'it' if len(always) == 1 else 'them'}")
    if evaluated_split == calibration_split:
        guarantee += f"; coverage is measured on the {calibration_split} images themselves (optimistic)"
    section = {"alpha": float(alpha), "method": method, "mondrian": bool(mondrian),
               "calibration_split": calibration_split, "calibration_images": len(calibration[1]),
               "approximate": not held_out, "guarantee": guarantee, "thresholds": fitted["thresholds"],
               **summary(labels, sets, class_names)}
    return section, fitted, sets


def read_stored(directory, source, temperature: float, class_names, notes: list) -> dict | None:
    """directory/conformal.json (evaluation writes it for W's best checkpoint; export copies it) when it was fitted
    for these weights (`source`: the checkpoint, None for an exported directory), classes and temperature; else
    None, with the reason appended to `notes` and logged: predict then writes an empty prediction_set."""
    path = Path(directory) / "conformal.json"
    fitted, why = None, None
    if not path.exists():
        why = (f"no conformal.json in {directory} (evaluated before conformal sets existed?): prediction_set is "
               "empty; `python -m jaxmed.evaluate --workdir W` fits them (then export again)")
    else:
        try:
            fitted = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise JaxmedError(f"cannot read {path}: {error}") from None
        thresholds = fitted.get("thresholds") if isinstance(fitted, dict) else None
        if (not isinstance(thresholds, list) or len(thresholds) != len(class_names) or fitted.get("method") not in
                METHODS or fitted.get("class_names", list(class_names)) != list(class_names)):
            raise JaxmedError(f"{path} does not hold conformal thresholds for the classes {list(class_names)}: "
                              "re-run `python -m jaxmed.evaluate --workdir W`")
        if source is not None and fitted.get("checkpoint") not in (None, source):
            why = (f"conformal.json is for {fitted.get('checkpoint')}, not {source}: not applied, prediction_set is "
                   "empty")
        elif not math.isclose(fitted.get("temperature", temperature), temperature, rel_tol=1e-9):
            why = (f"conformal.json was fitted at temperature {fitted.get('temperature')}, the probabilities use "
                   f"{temperature:g}: not applied, prediction_set is empty")
    if why:
        notes.append(why)
        log.warning("%s", why)
        return None
    return fitted


def sets_for_stored(fitted: dict | None, probabilities, digests) -> np.ndarray | None:
    """Prediction sets from conformal.json's thresholds, u from the images' digests; None without thresholds."""
    if fitted is None:
        return None
    uniforms = uniforms_for(digests, fitted.get("seed", 0)) if fitted["method"] != "lac" else None
    return prediction_sets(probabilities, fitted, uniforms)


def stored_summary(fitted: dict, sets: np.ndarray) -> dict:
    """What predict's summary.json says about the sets."""
    sizes = np.asarray(sets).sum(1)
    approximate = fitted.get("calibration_split") != "calibration"
    return {key: fitted.get(key) for key in ("method", "mondrian", "alpha", "calibration_split")} | {
        "mean_set_size": float(sizes.mean()) if len(sizes) else None, "empty_sets": int((sizes == 0).sum()),
        "guarantee": f"a set holds the true class with probability >= {1 - fitted['alpha']:g} for images exchangeable "
                     f"with the {fitted.get('calibration_split')} split"
                     + (" (approximate: that split also chose the checkpoint)" if approximate else "")}
