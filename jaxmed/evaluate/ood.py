"""Out-of-distribution detection: "this image is not the kind the model was trained on", fitted by every evaluation.

Post-hoc detectors over the checkpoint's penultimate features (the pooled representation its classifier reads) and
logits, all oriented so that a higher score is more out of distribution:

- energy: −logsumexp(logits) (Liu et al. 2020);
- mahalanobis: min over classes of the squared Mahalanobis distance to the class mean, one shared covariance
  (Lee et al. 2018);
- rmds: relative Mahalanobis, that minimum minus the distance to one class-agnostic Gaussian (Ren et al. 2021);
- vim: virtual logit — the norm of the features' residual off the principal subspace, scaled by alpha from train —
  minus the energy term logsumexp(logits) (Wang et al. 2022, as OpenOOD implements it);
- knn: distance to the k-th nearest train feature, features L2-normalised (Sun et al. 2022).

Statistics come from the train split (all of it, or a seeded sample of MAX_TRAIN_IMAGES), the threshold from val:
the score below which `eval.ood_keep` of the validation images fall. Stored as W/ood/detectors.npz (plain arrays,
read with allow_pickle=False) and W/ood/ood.json (method, thresholds, the checkpoint it was fitted for).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from etils import epath
from scipy.special import logsumexp

from jaxmed.errors import JaxmedError

DETECTORS = ("energy", "mahalanobis", "rmds", "vim", "knn")
# OpenOOD v1.5 (ImageNet-1k, near/far AUROC): ResNet-50 ViM 72.1/92.7 beats energy's 75.9/89.5 far; ViT-B/16 RMDS
# 80.1/92.6 and Mahalanobis 79.0/92.6 tie far, ViM 77.0/92.8. Far shift (not an MRI at all) is what predict must
# catch; on the demo's phantoms ViM flags every non-MRI image with a ResNet, and with a ViT Mahalanobis flags more
# than RMDS or ViM (README "Out-of-distribution detection" has the numbers).
DEFAULT_METHOD = {"vit": "mahalanobis", "cvt": "mahalanobis", "resnet": "vim", "efficientnet": "vim",
                  "jaxmed_sae": "mahalanobis"}
MAX_TRAIN_IMAGES = 20_000
KNN_NEIGHBOURS = 50
PROBE_KINDS = ("noise", "flat", "gradient", "checkerboard", "patch_shuffled")
PROBES_PER_KIND = 40
ARRAYS_FILE, META_FILE = "detectors.npz", "ood.json"
SELF_CHECK = ("AUROC of the evaluated split's (in-distribution) images against generated far-OOD probes — noise, "
              "flat, gradient, checkerboard images and the training images with their patches shuffled. A sanity "
              "check that the detector sees gross shift, not a measure of performance on real-world shift.")


@dataclasses.dataclass
class Detectors:
    """Every detector's statistics, fitted on train features; `scores` gives all of them for new features."""

    class_means: np.ndarray  # (classes, D)
    precision: np.ndarray  # (D, D): inverse of the shared within-class covariance
    background_mean: np.ndarray  # (D,): the class-agnostic Gaussian of RMDS
    background_precision: np.ndarray  # (D, D)
    vim_origin: np.ndarray  # (D,): −pinv(W) b, where the classifier's logits are zero
    vim_residual_basis: np.ndarray  # (D, D − principal dims): eigenvectors off the principal subspace
    vim_alpha: np.ndarray  # (): mean max train logit / mean train virtual logit
    knn_bank: np.ndarray  # (M, D) float32: L2-normalised train features
    knn_k: np.ndarray  # ()

    def scores(self, features, logits) -> dict[str, np.ndarray]:
        features, logits = np.asarray(features, np.float64), np.asarray(logits, np.float64)
        energy = logsumexp(logits, axis=-1)
        class_distances = _squared_mahalanobis(features, self.class_means, self.precision)
        background = _squared_mahalanobis(features, self.background_mean[None], self.background_precision)[:, 0]
        residual = np.linalg.norm((features - self.vim_origin) @ self.vim_residual_basis, axis=-1)
        return {"energy": -energy, "mahalanobis": class_distances.min(-1),
                "rmds": class_distances.min(-1) - background, "vim": float(self.vim_alpha) * residual - energy,
                "knn": _kth_neighbour_distance(self.knn_bank, _normalised(features), int(self.knn_k))}


def fit_detectors(features, logits, labels, classifier_kernel, classifier_bias, *, num_classes: int,
                  knn_k: int = KNN_NEIGHBOURS) -> Detectors:
    """From train features (N, D), their logits, labels, and the classifier's kernel (D, classes) and bias."""
    from sklearn.covariance import EmpiricalCovariance

    features, logits = np.asarray(features, np.float64), np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    means = np.stack([features[labels == c].mean(0) if c in present else np.full(features.shape[1], np.inf)
                      for c in range(num_classes)])  # an absent class is infinitely far: never the nearest
    centred = features - means[labels]
    shared = EmpiricalCovariance(assume_centered=True).fit(centred)
    background = EmpiricalCovariance().fit(features)
    # ViM: the origin where the logits vanish, and the residual space off the principal components around it
    kernel, bias = np.asarray(classifier_kernel, np.float64), np.asarray(classifier_bias, np.float64)
    origin = -np.linalg.pinv(kernel.T) @ bias
    eigenvalues, eigenvectors = np.linalg.eigh(EmpiricalCovariance(assume_centered=True).fit(features - origin)
                                               .covariance_)
    principal = vim_principal_dims(features.shape[1], len(features))
    residual_basis = eigenvectors[:, np.argsort(-eigenvalues)[principal:]]
    virtual = np.linalg.norm((features - origin) @ residual_basis, axis=-1)
    alpha = logits.max(-1).mean() / max(virtual.mean(), 1e-12)
    return Detectors(means, shared.precision_, background.location_, background.precision_, origin, residual_basis,
                     np.asarray(alpha), _normalised(features).astype(np.float32),
                     np.asarray(min(knn_k, len(features))))


def vim_principal_dims(dim: int, count: int) -> int:
    """The ViM paper's choice (1000 of ≥1500 features, 512 of 768, else half), below the train sample's rank."""
    chosen = 1000 if dim >= 1500 else 512 if dim >= 768 else max(1, dim // 2)
    return max(1, min(chosen, count - 1, dim - 1))


def _squared_mahalanobis(features, means, precision) -> np.ndarray:
    """(N, K): (x − μ_k)ᵀ P (x − μ_k) for every row and mean, expanded so no (N, K, D) array is built."""
    finite = np.isfinite(means).all(-1)
    safe = np.where(finite[:, None], means, 0.0)
    projected = features @ precision
    quadratic = (np.einsum("nd,nd->n", projected, features)[:, None] - 2 * projected @ safe.T
                 + np.einsum("kd,de,ke->k", safe, precision, safe)[None])
    return np.where(finite[None], np.maximum(quadratic, 0.0), np.inf)


def _normalised(features) -> np.ndarray:
    features = np.asarray(features, np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def _kth_neighbour_distance(bank, queries, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    if not len(queries):
        return np.zeros(0)
    search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(np.asarray(bank, np.float64))
    return search.kneighbors(queries, return_distance=True)[0][:, -1]


def threshold_at(val_scores, keep: float) -> float:
    """The score at or below which a `keep` fraction of the validation images lie: above it is flagged."""
    _check_keep(keep)
    return float(np.quantile(np.asarray(val_scores, np.float64), keep, method="higher"))


def check_config(eval_config) -> None:
    """Before training, so a mistyped key fails now rather than at the evaluation hours later."""
    if eval_config.ood_method and eval_config.ood_method not in DETECTORS:
        default_method("", eval_config.ood_method)
    _check_keep(eval_config.ood_keep)


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise JaxmedError(f"eval.ood_keep={keep!r} must be in (0, 1]: the fraction of validation images kept as in "
                          "distribution (0.95 flags about 5% of them)")


def default_method(model_type: str, configured: str = "") -> str:
    method = configured or DEFAULT_METHOD.get(model_type, "mahalanobis")
    if method not in DETECTORS:
        raise JaxmedError(f"eval.ood_method={method!r} is not a detector; choose one of {', '.join(DETECTORS)} or "
                          "leave it empty for the architecture's default")
    return method


@dataclasses.dataclass
class Fitted:
    """Detectors with their validation thresholds and the chosen method: what predict applies."""

    detectors: Detectors
    method: str
    thresholds: dict  # detector → threshold
    meta: dict  # keep, checkpoint, counts, ...

    def score(self, features, logits) -> tuple[np.ndarray, np.ndarray]:
        """(score of the chosen method, flagged out of distribution)."""
        scores = self.detectors.scores(features, logits)[self.method]
        return scores, scores > self.thresholds[self.method]


def save(directory, fitted: Fitted) -> None:
    """Into a fresh `directory` (local or gs://): anything an older fit left there goes."""
    directory = epath.Path(directory)
    remove(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ARRAYS_FILE).open("wb") as handle:
        np.savez(handle, **{field.name: np.asarray(getattr(fitted.detectors, field.name))
                            for field in dataclasses.fields(Detectors)})
    (directory / META_FILE).write_text(json.dumps(
        {"method": fitted.method, "thresholds": fitted.thresholds, **fitted.meta}, indent=1) + "\n")


def remove(directory) -> None:
    epath.Path(directory).rmtree(missing_ok=True)


def load(directory) -> Fitted | None:
    """W/ood (or an exported model's ood/) → Fitted; None when nothing was fitted there."""
    directory = epath.Path(directory)
    if not (directory / META_FILE).exists():
        return None
    try:
        meta = json.loads((directory / META_FILE).read_text())
        with (directory / ARRAYS_FILE).open("rb") as handle, np.load(handle, allow_pickle=False) as arrays:
            detectors = Detectors(**{field.name: arrays[field.name] for field in dataclasses.fields(Detectors)})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise JaxmedError(f"cannot read the OOD detectors in {directory}: {error}; re-run python -m jaxmed.evaluate "
                          "to fit them again") from None
    method, thresholds = meta.pop("method", None), meta.pop("thresholds", None)
    if method not in DETECTORS or not isinstance(thresholds, dict) or method not in thresholds:
        raise JaxmedError(f"{directory / META_FILE}: method must be one of {', '.join(DETECTORS)} with a threshold; "
                          "re-run python -m jaxmed.evaluate")
    return Fitted(detectors, method, {key: float(value) for key, value in thresholds.items()}, meta)


def far_ood_probes(sources, per_kind: int, seed: int, gray: bool) -> tuple[np.ndarray, list[str]]:
    """Generated far-OOD images at the sources' size (uint8 N×H×W×3): noise, flat, gradient, checkerboard, and the
    sources (training images) with their 4×4 grid of patches shuffled. Gray when the model sees gray images."""
    rng = np.random.default_rng(seed)
    sources = np.asarray(sources)
    height, width = sources.shape[1:3]
    channels = 1 if gray else 3
    rows, columns = np.mgrid[0:height, 0:width] / max(height, width)
    images, kinds = [], []

    def levels():
        return rng.integers(0, 256, channels).astype(np.float64)

    for kind in PROBE_KINDS:
        for index in range(per_kind):
            if kind == "noise":
                image = rng.integers(0, 256, (height, width, channels)).astype(np.float64)
            elif kind == "flat":
                image = np.broadcast_to(levels(), (height, width, channels))
            elif kind == "gradient":
                angle = rng.uniform(0, 2 * np.pi)
                ramp = np.cos(angle) * columns + np.sin(angle) * rows
                ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
                start, end = levels(), levels()
                image = start + ramp[..., None] * (end - start)
            elif kind == "checkerboard":
                period = int(rng.integers(2, max(3, min(height, width) // 4 + 1)))
                board = ((np.arange(height)[:, None] // period + np.arange(width)[None] // period) % 2)[..., None]
                image = np.where(board, levels(), levels())
            else:
                image = _shuffle_patches(sources[index % len(sources)], rng)
            image = np.clip(image, 0, 255).astype(np.uint8)
            images.append(np.broadcast_to(image, (height, width, 3)) if image.shape[-1] == 1 else image)
            kinds.append(kind)
    return np.stack(images), kinds


def _shuffle_patches(image, rng, grid: int = 4) -> np.ndarray:
    height, width = image.shape[:2]
    step_h, step_w = height // grid, width // grid
    shuffled = np.array(image)
    patches = [image[r * step_h:(r + 1) * step_h, c * step_w:(c + 1) * step_w] for r in range(grid)
               for c in range(grid)]
    for position, source in enumerate(rng.permutation(len(patches))):
        r, c = divmod(position, grid)
        shuffled[r * step_h:(r + 1) * step_h, c * step_w:(c + 1) * step_w] = patches[source]
    return shuffled


def self_check(in_distribution: dict, probes: dict, kinds: list[str]) -> dict:
    """Per detector: AUROC of in-distribution scores (negatives) against all probes and each kind (positives)."""
    from sklearn.metrics import roc_auc_score

    kinds = np.asarray(kinds)

    def auroc(inside, outside):
        truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        return float(roc_auc_score(truth, np.r_[inside, outside]))

    return {"what": SELF_CHECK, "probes": {kind: int(np.sum(kinds == kind)) for kind in PROBE_KINDS},
            "auroc": {name: auroc(in_distribution[name], probes[name]) for name in DETECTORS},
            "auroc_per_probe": {name: {kind: auroc(in_distribution[name], probes[name][kinds == kind])
                                       for kind in PROBE_KINDS} for name in DETECTORS}}


def flag_rate(flags) -> dict:
    """Flagged count and rate with its 95% Wilson interval."""
    from statsmodels.stats.proportion import proportion_confint

    flagged, total = int(np.sum(flags)), len(flags)
    low, high = proportion_confint(flagged, total, alpha=0.05, method="wilson") if total else (None, None)
    return {"flagged": flagged, "num_examples": total, "rate": flagged / total if total else None,
            "ci95": [None if low is None else float(low), None if high is None else float(high)]}


def fit_on_run(run, params, stats, flat: dict, split_name: str, source: str) -> tuple[dict, Fitted | None, dict]:
    """Every evaluation's OOD work: features of train (≤ MAX_TRAIN_IMAGES, seeded), val, the evaluated split and
    the probes; detectors fitted on train, thresholds on val. → (report section, Fitted or None, {"ood_score",
    "out_of_distribution"} of the evaluated split in index order, empty without val)."""
    from jaxmed.data.cache import eval_size
    from jaxmed.data.pipeline import eval_view
    from jaxmed.train.run import make_features_step, predict_features

    ec, splits = run.config.eval, run.dataset.splits
    check_config(ec)
    method = default_method(run.spec.hf_config.model_type, ec.ood_method)
    if "val" not in splits:
        return ({"method": method, "skipped": "no val split to set the threshold on (data.val_fraction = 0): no OOD "
                 "detection"}, None, {})
    step, train = make_features_step(run), splits["train"]
    rows = np.arange(len(train))
    if len(rows) > MAX_TRAIN_IMAGES:
        rows = np.sort(np.random.default_rng(ec.seed).choice(len(train), MAX_TRAIN_IMAGES, replace=False))
    sample = dataclasses.replace(train, images=_Rows(train.images, rows), labels=train.labels[rows],
                                 sizes=train.sizes[rows], ids=[train.ids[row] for row in rows],
                                 groups=None if train.groups is None else [train.groups[row] for row in rows])
    _, train_features, train_logits = predict_features(run, step, params, stats, sample)
    detectors = fit_detectors(train_features, train_logits, sample.labels, flat["classifier.kernel"],
                              flat["classifier.bias"], num_classes=len(run.dataset.class_names))
    _, val_features, val_logits = predict_features(run, step, params, stats, splits["val"])
    val_scores = detectors.scores(val_features, val_logits)
    thresholds = {name: threshold_at(val_scores[name], ec.ood_keep) for name in DETECTORS}
    _, features, logits = predict_features(run, step, params, stats, splits[split_name])
    scores = detectors.scores(features, logits)
    output = eval_size(run.preprocessor)
    views = np.stack([eval_view(train.images[row], train.sizes[row], run.preprocessor, output, model_ready=False,
                                gray=train.grayscale)  # a seeded sample across the (class-sorted) split
                      for row in np.random.default_rng(ec.seed).permutation(rows)[:PROBES_PER_KIND]])
    probe_images, kinds = far_ood_probes(views, PROBES_PER_KIND, ec.seed, gray=bool(run.config.data.grayscale))
    probes = dataclasses.replace(train, name="probes", images=probe_images, labels=np.zeros(len(kinds), np.int32),
                                 sizes=np.tile(np.asarray(output, np.int32), (len(kinds), 1)), model_ready=True,
                                 ids=[f"probe_{kind}_{i}" for i, kind in enumerate(kinds)], groups=None)
    _, probe_features, probe_logits = predict_features(run, step, params, stats, probes)
    meta = {"keep": ec.ood_keep, "checkpoint": source, "fitted_on": {"train": len(rows), "val": len(val_features)},
            "model_type": run.spec.hf_config.model_type, "knn_k": int(detectors.knn_k),
            "vim_principal_dims": detectors.class_means.shape[1] - detectors.vim_residual_basis.shape[1]}
    fitted = Fitted(detectors, method, thresholds, meta)
    flags = {name: scores[name] > thresholds[name] for name in DETECTORS}
    section = {"method": method, "method_chosen_by": "eval.ood_method" if ec.ood_method else
               f"default for {meta['model_type']}", "threshold": thresholds[method], "keep": ec.ood_keep,
               "threshold_set_on": "val", **meta, "flag_rate": flag_rate(flags[method]),
               "flag_rate_per_detector": {name: flag_rate(flags[name]) for name in DETECTORS},
               "self_check": self_check(scores, detectors.scores(probe_features, probe_logits), kinds)}
    return section, fitted, {"ood_score": scores[method], "out_of_distribution": flags[method]}  # index order


class _Rows:
    """A seeded sample of a memory-mapped split's images, read row by row as the eval batches ask."""

    def __init__(self, images, rows):
        self.images, self.rows = images, rows

    def __getitem__(self, index):
        return self.images[self.rows[index]]

    def __len__(self) -> int:
        return len(self.rows)
