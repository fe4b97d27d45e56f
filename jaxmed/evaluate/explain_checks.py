"""Checks of the explanations instead of pictures of them: do the heatmaps show what the model uses, do they depend
on what it learnt, and do they fall on the lesion?

- Deletion / insertion (Petsiuk et al., BMVC 2018): remove (blacken) the image's pixels most salient first, or
  insert them into a blurred copy, and follow the probability of the explained class; a faithful map makes it fall
  fast (small deletion AUC) and rise fast (large insertion AUC). Compared on the same images with random maps on the
  explanation's own grid (a fair baseline: the same blocky shape, no knowledge), with bootstrap intervals of the
  paired difference.
- Model randomisation (Adebayo et al., NeurIPS 2018): re-initialise the weights cascading from the classifier down
  and recompute the maps; a map that still rank-correlates with the trained one explains the architecture, not the
  model.
- Localisation where lesion masks exist: the pointing game (the map's maximum inside the mask dilated by 7% of the
  side, Zhang et al.'s 15 px at 224) and the share of the map's energy inside the mask, each beside its chance level.
"""

from __future__ import annotations

import functools
from typing import Callable

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from jaxmed.evaluate import explain
from jaxmed.train import optim

STEPS = 16  # points of the deletion / insertion curves besides the start
CHUNK = 64  # images per forward pass (a fixed size: one compilation)
POINTING_TOLERANCE = 0.07  # of the image side
BLUR_SIGMA = 1 / 16  # insertion's start: the image blurred with this σ (of the side), lesions no longer visible
RANDOMISATION_PASS = 0.5  # |Spearman ρ| after re-initialising everything below which the maps count as model-dependent

# Parameter-path prefixes in cascade order: the head first, then the repeated blocks from the top down. Each stage of
# the check re-initialises everything before it too (Adebayo's cascading randomisation).
HEADS = {"vit": ("classifier", "vit.layernorm"), "cvt": ("classifier", "layernorm"),
         "resnet": ("classifier",), "efficientnet": ("classifier", "efficientnet.encoder.top_conv", "efficientnet.encoder.top_bn")}
BLOCKS = {"vit": "vit.encoder.layer", "cvt": "cvt.encoder.stages", "resnet": "resnet.encoder.stages",
          "efficientnet": "efficientnet.encoder.blocks"}


def check(model, images_uint8, normalise: Callable, labels, masks, class_names, *, maps_of: dict[str, Callable],
          seed: int = 0, bootstrap: int = 1000) -> dict:
    """All checks on these images → the explanations.json dict. `normalise` turns uint8 images into the model's
    input (the run's preprocessor.normalize); `maps_of` names each explanation method and gives its function
    (model, pixels) → maps (B, h, w); `masks` is bool (B, H, W) aligned with the images, or None."""
    images_uint8 = np.asarray(images_uint8)
    probabilities = _probability_fn(model)
    pixels = normalise(images_uint8)
    baseline = probabilities(normalise(images_uint8))
    targets = baseline.argmax(-1)
    rng = np.random.default_rng(seed)
    result = {"images": int(len(images_uint8)), "explained_class": "predicted", "steps": STEPS,
              "methods": {}, "settings": {"deletion_fill": "black (0)", "insertion_start": f"Gaussian blur, σ = "
                                          f"side/{round(1 / BLUR_SIGMA)}", "random_baseline":
                                          "uniform random map on the explanation's own grid, resized alike"}}
    for name, maps_fn in maps_of.items():
        maps = np.asarray(maps_fn(model, jnp.asarray(pixels)), np.float32)
        random_maps = rng.random(maps.shape, dtype=np.float32)
        entry = {}
        for kind in ("deletion", "insertion"):
            ours = perturbation_auc(probabilities, normalise, images_uint8, upsample(maps, images_uint8.shape[1:3]),
                                    targets, kind)
            chance = perturbation_auc(probabilities, normalise, images_uint8,
                                      upsample(random_maps, images_uint8.shape[1:3]), targets, kind)
            entry[kind] = _compare_auc(ours, chance, kind, bootstrap, seed)
        entry["randomisation"] = randomisation(model, maps_fn, jnp.asarray(pixels), maps, seed=seed,
                                               bootstrap=bootstrap)
        if masks is not None:
            entry["localisation"] = localisation(upsample(maps, images_uint8.shape[1:3]), masks, labels, class_names)
        entry["verdict"] = _verdict(name, entry)
        result["methods"][name] = entry
    return result


# ------------------------------------------------------------------------------------------- deletion / insertion


def upsample(maps: np.ndarray, shape) -> np.ndarray:
    """(B, h, w) grid maps → (B, H, W), bilinear (as the overlays draw them)."""
    height, width = int(shape[0]), int(shape[1])
    return np.stack([cv2.resize(np.asarray(m, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                     for m in maps])


def perturbation_auc(probabilities, normalise, images_uint8, saliency, targets, kind: str) -> np.ndarray:
    """Per-image area under the explained class's probability as the most salient pixels are deleted (set to 0) or
    inserted (into the blurred image), at fractions 0, 1/STEPS, …, 1 of the pixels."""
    images = np.asarray(images_uint8)
    count, height, width = images.shape[:3]
    start = images if kind == "deletion" else _blurred(images)
    end = np.zeros_like(images) if kind == "deletion" else images
    # the most salient pixel first; ties (flat maps) in a fixed order
    order = np.argsort(-saliency.reshape(count, -1), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(height * width)[None, :], axis=1)
    ranks = ranks.reshape(count, height, width)
    fractions = np.linspace(0, 1, STEPS + 1)
    curves = np.empty((count, STEPS + 1))
    for step, fraction in enumerate(fractions):
        changed = (ranks < round(fraction * height * width))[..., None]
        perturbed = np.where(changed, end, start)
        curves[:, step] = probabilities(normalise(perturbed))[np.arange(count), targets]
    return np.trapezoid(curves, fractions, axis=1)


def _blurred(images: np.ndarray) -> np.ndarray:
    sigma = max(1.0, BLUR_SIGMA * images.shape[1])
    return np.stack([cv2.GaussianBlur(image, (0, 0), sigma) for image in images]).reshape(images.shape)


def _compare_auc(ours: np.ndarray, chance: np.ndarray, kind: str, bootstrap: int, seed: int) -> dict:
    difference = ours - chance
    better = bool(np.all(np.isfinite(difference)))
    low, high, method = mean_interval(difference, bootstrap, seed)
    # deletion: smaller is better; insertion: larger
    beats = bool(high < 0) if kind == "deletion" else bool(low > 0)
    return {"auc": float(ours.mean()), "auc_ci": list(mean_interval(ours, bootstrap, seed)[:2]),
            "random_auc": float(chance.mean()), "random_auc_ci": list(mean_interval(chance, bootstrap, seed)[:2]),
            "difference": float(difference.mean()), "difference_ci": [low, high], "interval": method,
            "better_is": "lower" if kind == "deletion" else "higher", "beats_random": beats and better}


def mean_interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float, str]:
    """95% bootstrap interval of the mean over images: BCa, percentile where BCa is undefined (e.g. all equal)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2 or resamples <= 0 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean()), "none (too few or identical values)"
    for method in ("BCa", "percentile"):
        result = stats.bootstrap((values,), np.mean, n_resamples=resamples, method=method, random_state=seed)
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high), f"{method} bootstrap over images"
    return float("nan"), float("nan"), "bootstrap failed"


# ---------------------------------------------------------------------------------------------- randomisation


def cascade(model_type: str, paths: list[str]) -> list[tuple[str, list[str]]]:
    """[(stage name, parameter paths re-initialised at that stage, cumulative)] from the head down: the head, the
    top block, the top half of the blocks, everything (embeddings included)."""
    prefix = BLOCKS[model_type] + "."
    blocks = sorted({int(p[len(prefix):].split(".")[0]) for p in paths if p.startswith(prefix)})

    def under(*prefixes):
        return [p for p in paths if any(p == q or p.startswith(q + ".") for q in prefixes)]

    heads = list(HEADS[model_type])
    stages = [("head", under(*heads))]
    if blocks:
        stages.append(("top block", under(*heads, f"{prefix}{blocks[-1]}")))
        half = blocks[len(blocks) // 2:]
        if len(half) > 1:
            stages.append(("top half", under(*heads, *[f"{prefix}{b}" for b in half])))
    stages.append(("all", list(paths)))
    return stages


def randomisation(model, maps_fn, pixels, trained_maps, *, seed: int, bootstrap: int) -> dict:
    """Spearman ρ between the trained model's maps and those of models re-initialised cascading from the head."""
    model_type = model.config.model_type
    fresh = type(model)(model.config, rngs=nnx.Rngs(seed + 1))
    graph, trained, rest = nnx.split(model, nnx.Param, ...)
    random_flat = {optim.dotted(path): leaf for path, leaf in
                   jax.tree_util.tree_leaves_with_path(nnx.state(fresh, nnx.Param))}
    paths = list(random_flat)
    stages = []
    for stage, chosen in cascade(model_type, paths):
        chosen = set(chosen)
        mixed = jax.tree_util.tree_map_with_path(
            lambda path, leaf: random_flat[optim.dotted(path)] if optim.dotted(path) in chosen else leaf, trained)
        maps = np.asarray(maps_fn(nnx.merge(graph, mixed, rest), pixels), np.float32)
        rhos = np.array([_spearman(a, b) for a, b in zip(trained_maps, maps)])
        defined = rhos[np.isfinite(rhos)]
        low, high, method = mean_interval(defined, bootstrap, seed) if len(defined) else (np.nan, np.nan, "none")
        stages.append({"stage": stage, "parameters": len(chosen), "spearman": _mean(defined),
                       "spearman_ci": [low, high], "interval": method, "undefined": int(len(rhos) - len(defined))})
    final = stages[-1]["spearman"]
    return {"stages": stages, "model_dependent": bool(final is not None and abs(final) < RANDOMISATION_PASS),
            "rule": f"|mean ρ| after re-initialising every weight < {RANDOMISATION_PASS}"}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # a constant map has no ranks to correlate
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------------------------- localisation


def localisation(saliency: np.ndarray, masks: np.ndarray, labels, class_names) -> dict:
    """Pointing game and energy share per class, over images whose mask is not empty, with chance levels: the
    dilated mask's share of the image (a random point) and the mask's share (a flat map)."""
    labels = np.asarray(labels)
    height, width = masks.shape[1:]
    radius = max(1, round(POINTING_TOLERANCE * max(height, width)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    per_class, hits_all, shares_all, hit_chance, share_chance = {}, [], [], [], []
    for index, name in enumerate(class_names):
        rows = [i for i in np.flatnonzero(labels == index) if masks[i].any()]
        if not rows:
            continue
        hits, shares, dilated_area, area = [], [], [], []
        for i in rows:
            dilated = cv2.dilate(masks[i].astype(np.uint8), kernel) > 0
            peak = np.unravel_index(np.argmax(saliency[i]), saliency[i].shape)
            total = float(saliency[i].sum())
            hits.append(bool(dilated[peak]) if total > 0 else False)
            shares.append(float(saliency[i][masks[i]].sum() / total) if total > 0 else 0.0)
            dilated_area.append(float(dilated.mean()))
            area.append(float(masks[i].mean()))
        per_class[name] = {"images": len(rows), "pointing_game": float(np.mean(hits)),
                           "pointing_chance": float(np.mean(dilated_area)),
                           "energy_in_mask": float(np.mean(shares)), "energy_chance": float(np.mean(area))}
        hits_all += hits
        shares_all += shares
        hit_chance += dilated_area
        share_chance += area
    if not hits_all:
        return {"images": 0, "note": "no evaluated image has a non-empty lesion mask"}
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(int(np.sum(hits_all)), len(hits_all), method="wilson")
    return {"images": len(hits_all), "pointing_game": float(np.mean(hits_all)), "pointing_game_ci": [low, high],
            "interval": "Wilson", "pointing_chance": float(np.mean(hit_chance)),
            "energy_in_mask": float(np.mean(shares_all)), "energy_chance": float(np.mean(share_chance)),
            "tolerance_pixels": radius, "per_class": per_class,
            "without_lesion": int(sum(1 for m in masks if not m.any()))}


# ----------------------------------------------------------------------------------------------------- helpers


def _verdict(name: str, entry: dict) -> str:
    parts = []
    faithful = [kind for kind in ("deletion", "insertion") if entry[kind]["beats_random"]]
    parts.append(f"{name} beats random maps on {' and '.join(faithful)}" if faithful else
                 f"{name} does not beat random maps on deletion or insertion")
    parts.append("changes when the weights are re-initialised" if entry["randomisation"]["model_dependent"] else
                 "barely changes when the weights are re-initialised (it may explain the architecture, not the model)")
    place = entry.get("localisation")
    if place and place.get("images"):
        on = place["pointing_game"] > place["pointing_chance"] and place["pointing_game_ci"][0] > place[
            "pointing_chance"]
        parts.append(f"its maximum lies on the lesion in {place['pointing_game']:.0%} of images (chance "
                     f"{place['pointing_chance']:.0%}): " + ("it points at the lesion" if on else
                                                             "it does NOT point at the lesion better than chance"))
    return "; ".join(parts)


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _probability_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    graph, state = nnx.split(model)

    def run(pixels: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(pixels), CHUNK):
            chunk = pixels[start:start + CHUNK]
            padded = np.concatenate([chunk, np.zeros((CHUNK - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(_softmax(graph, state, jnp.asarray(padded)))[:len(chunk)])
        return np.concatenate(out)
    return run


@functools.partial(jax.jit, static_argnums=0)
def _softmax(graph, state, pixels):
    model = explain._eval_merge(graph, state)
    return jax.nn.softmax(model(pixels).astype(jnp.float32), axis=-1)
