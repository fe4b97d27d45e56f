"""Brain-MRI-like phantoms for 4 classes: the data of the demo and of the tests, generated offline in a second.

T1-weighted-looking slices in three planes (axial, coronal, sagittal) with scalp, skull, cortex, white matter and
plane-specific anatomy (ventricles, fissure, cerebellum, brainstem, corpus callosum, a normal pituitary gland), and
per class: glioma-like (irregular, ill-defined, hypointense intra-axial mass with oedema, sometimes a necrotic
core), meningioma-like (round, sharp, iso/hyperintense extra-axial mass against the skull), pituitary-like (mass
at the sella), or none. Anatomy, position, contrast, bias field, blur and Rician noise vary per image, and every
class has small bright distractor blobs, so the task needs location and shape, not one pixel statistic.
Everything is vectorised over a chunk of images; deterministic by seed.
"""

from __future__ import annotations

import cv2
import numpy as np

CLASS_NAMES = ["glioma", "meningioma", "no_tumor", "pituitary"]
PLANES = ["axial", "coronal", "sagittal"]
VERSION = 2  # bump when the images change, so caches of the old phantoms are not reused
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def generate(split: str, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ images uint8 (N, size, size), labels int32 (N,), planes int32 (N,) for N = 4 * per_class, class-sorted."""
    images, labels, planes, _ = generate_with_masks(split, per_class, size, seed)
    return images, labels, planes


def generate_with_masks(split: str, per_class: int, size: int, seed: int):
    """`generate` plus each image's lesion mask, bool (N, size, size): where the drawn mass is over half its own
    intensity (glioma: the mass, not the oedema around it); empty for no_tumor. The images are the same."""
    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int32), per_class)
    images = np.empty((len(labels), size, size), np.uint8)
    masks = np.zeros((len(labels), size, size), bool)
    planes = np.empty(len(labels), np.int32)
    chunk_size = max(16, 2**22 // size**2)  # bounds memory; a function of size, so images stay deterministic
    for chunk, start in enumerate(range(0, len(labels), chunk_size)):
        rng = np.random.default_rng([seed, _SPLIT_CODES.get(split, 9), chunk])
        stop = min(start + chunk_size, len(labels))
        images[start:stop], planes[start:stop], masks[start:stop] = _phantoms(rng, labels[start:stop], size)
    return images, labels, planes, masks


def _phantoms(rng: np.random.Generator, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = len(labels)
    plane = rng.integers(0, 3, count)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = grid[None, None, :], grid[None, :, None]

    # Head pose and shape: brain-local coordinates (u, v) make the head outline the unit circle.
    angle = _uniform(rng, count, -0.2, 0.2)
    dx, dy = x - _uniform(rng, count, -0.06, 0.06), y - _uniform(rng, count, -0.06, 0.06)
    xr, yr = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
    half_width = np.array([0.70, 0.78, 0.86], np.float32)[plane, None, None] * _uniform(rng, count, 0.9, 1.05)
    half_height = np.array([0.86, 0.80, 0.74], np.float32)[plane, None, None] * _uniform(rng, count, 0.9, 1.05)
    u, v = xr / half_width, yr / half_height
    rho, theta = np.hypot(u, v), np.arctan2(v, u)

    folds = rng.integers(14, 22, (count, 1, 1)).astype(np.float32)
    gyri = 0.84 * (1 + 0.015 * np.sin(folds * theta + _uniform(rng, count, 0, 6.3)))
    lobes = rng.integers(5, 9, (count, 1, 1)).astype(np.float32)
    white = 0.62 * (1 + 0.07 * np.sin(lobes * theta + _uniform(rng, count, 0, 6.3)))
    image = np.where(rho < 1.0, np.float32(0.75), np.float32(0.0))  # scalp fat
    image = np.where(rho < 0.93, 0.12, image)  # skull
    image = np.where(rho < 0.86, 0.22, image)  # CSF
    brain = rho < gyri
    image = np.where(brain, 0.45, image)  # cortex
    image = np.where(rho < white, 0.68, image)  # white matter

    sella = np.empty((count, 2, 1, 1), np.float32)
    for index, anatomy in enumerate((_axial, _coronal, _sagittal)):
        rows = np.flatnonzero(plane == index)
        image[rows], sella[rows] = anatomy(rng, image[rows], u[rows], v[rows], brain[rows])
    sella += _uniform(rng, count, -0.03, 0.03)[:, None]
    image = np.where(_ellipse(u, v, sella[:, 0], sella[:, 1], 0.11, 0.08, 0.0) < 1, 0.2, image)  # cistern (CSF)
    image = np.where(_ellipse(u, v, sella[:, 0], sella[:, 1], 0.05, 0.035, 0.0) < 1, 0.55, image)  # normal gland

    # Distractors in every class: small bright blobs (vessels, flow artefacts).
    for _ in range(3):
        present = rng.random((count, 1, 1)) < 0.4
        blob_angle, blob_radius = _uniform(rng, count, 0, 2 * np.pi), _uniform(rng, count, 0.1, 0.75)
        blob = _soft_disk(u, v, blob_radius * np.cos(blob_angle), blob_radius * np.sin(blob_angle),
                          _uniform(rng, count, 0.015, 0.035), 0.01)
        image = image + present * blob * (0.85 - image)

    texture = _smooth_noise(rng, count, size, cells=7)
    lesion = np.zeros(image.shape, bool)
    for label, add_tumour in ((0, _add_glioma), (1, _add_meningioma), (3, _add_pituitary)):
        rows = np.flatnonzero(labels == label)
        image[rows], mass = add_tumour(rng, image[rows], u[rows], v[rows], texture[rows], sella[rows])
        lesion[rows] = mass > 0.5

    # Acquisition: bias field, contrast curve, gain, blur, Rician noise.
    image = image * (1 + _uniform(rng, count, -0.15, 0.15) * x + _uniform(rng, count, -0.15, 0.15) * y)
    image = np.clip(image, 0, None) ** _uniform(rng, count, 0.8, 1.25) * _uniform(rng, count, 0.85, 1.1)
    image = _blur(image, rng.uniform(0.0, 1.0, count) * size / 96)
    sigma = _uniform(rng, count, 0.015, 0.06)
    noise = rng.standard_normal((2,) + image.shape, dtype=np.float32) * sigma
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), plane.astype(np.int32), lesion


# Plane-specific anatomy: each takes the rows of that plane and returns them with the sella position (u, v).

def _axial(rng, image, u, v, brain):
    count = len(image)
    scale = _uniform(rng, count, 0.7, 1.4)  # ventricle size varies with age
    fissure = brain & (np.abs(u) < 0.012) & (np.abs(v) > 0.3)
    lateral = np.minimum(_ellipse(u, v, -0.12, -0.05, 0.07 * scale, 0.28 * scale, 0.25),
                         _ellipse(u, v, 0.12, -0.05, 0.07 * scale, 0.28 * scale, -0.25))
    image = np.where(fissure, 0.2, image)
    return np.where(lateral < 1, 0.15, image), _sella(count, 0.0, 0.30)


def _coronal(rng, image, u, v, brain):
    count = len(image)
    scale = _uniform(rng, count, 0.7, 1.4)
    fissure = brain & (np.abs(u) < 0.012) & (v < -0.15)
    horns = np.minimum(_ellipse(u, v, -0.11, -0.12, 0.06 * scale, 0.12 * scale, -0.5),
                       _ellipse(u, v, 0.11, -0.12, 0.06 * scale, 0.12 * scale, 0.5))
    image = np.where(fissure, 0.2, image)
    return np.where(horns < 1, 0.15, image), _sella(count, 0.0, 0.42)


def _sagittal(rng, image, u, v, brain):
    count = len(image)
    scale = _uniform(rng, count, 0.7, 1.4)
    crescent = _ellipse(u, v, 0.0, -0.02, 0.30 * scale, 0.07 * scale, 0.0)
    callosum = (np.abs(_ellipse(u, v, 0.0, 0.02, 0.46, 0.24, 0.0) - 1) < 0.18) & (v < -0.02)
    cerebellum = _ellipse(u, v, -0.42, 0.52, 0.30, 0.20, 0.2) < 1
    stem = _ellipse(u, v, 0.02, 0.58, 0.10, 0.28, -0.2) < 1
    image = np.where(crescent < 1, 0.15, image)
    image = np.where(callosum, 0.78, image)
    image = np.where(cerebellum, 0.55 + 0.12 * np.sin(45 * v), image)  # folia
    return np.where(stem, 0.62, image), _sella(count, 0.12, 0.38)


def _sella(count, u, v):
    return np.broadcast_to(np.array([u, v], np.float32)[None, :, None, None], (count, 2, 1, 1))


# Tumours: each takes the rows of its class and returns them with the mass drawn in.

def _add_glioma(rng, image, u, v, texture, sella):
    count = len(image)
    centre_angle, centre_radius = _uniform(rng, count, 0, 2 * np.pi), _uniform(rng, count, 0.1, 0.5)
    cu, cv = centre_radius * np.cos(centre_angle), centre_radius * np.sin(centre_angle)
    distance, around = np.hypot(u - cu, v - cv), np.arctan2(v - cv, u - cu)
    radius = _uniform(rng, count, 0.15, 0.30) * np.ones_like(u)
    for harmonic in range(2, 6):  # infiltrative, irregular outline
        radius = radius * (1 + _uniform(rng, count, 0, 0.12) * np.cos(harmonic * around
                                                                       + _uniform(rng, count, 0, 6.3)))
    edge = _uniform(rng, count, 0.03, 0.07)  # ill-defined margin
    oedema = _sigmoid((1.5 * radius - distance) / (2 * edge))
    mass = _sigmoid((radius - distance) / edge)
    necrosis = (rng.random((count, 1, 1)) < 0.5) * _sigmoid((0.45 * radius - distance) / 0.02)
    value = _uniform(rng, count, 0.15, 0.4) + 0.12 * texture  # hypointense, heterogeneous
    image = image - 0.12 * oedema
    image = image + mass * (value - image)
    return image + necrosis * (0.12 - image), mass


def _add_meningioma(rng, image, u, v, texture, sella):
    count = len(image)
    radius = _uniform(rng, count, 0.12, 0.24)
    place = _uniform(rng, count, 0, 2 * np.pi)
    centre = 0.84 - 0.75 * radius  # abutting the inner table of the skull: extra-axial
    cu, cv = centre * np.cos(place), centre * np.sin(place)
    distance = np.sqrt(_ellipse(u, v, cu, cv, radius * _uniform(rng, count, 0.9, 1.1), radius, place)) * radius
    cleft = (rng.random((count, 1, 1)) < 0.6) & (distance > radius) & (distance < radius + 0.025)
    mass = _sigmoid((radius - distance) / 0.012)  # sharp margin
    value = _uniform(rng, count, 0.75, 0.95) + 0.03 * texture  # homogeneous, bright
    image = np.where(cleft, 0.2, image)  # CSF cleft around the mass
    return image + mass * (value - image), mass


def _add_pituitary(rng, image, u, v, texture, sella):
    count = len(image)
    radius = _uniform(rng, count, 0.09, 0.17)
    cu, cv = sella[:, 0] + _uniform(rng, count, -0.03, 0.03), sella[:, 1] + _uniform(rng, count, -0.03, 0.03)
    distance = np.hypot(u - cu, v - cv)
    snowman = rng.random((count, 1, 1)) < 0.5  # suprasellar extension: a second lobe above
    upper = np.hypot(u - cu, v - (cv - 0.9 * radius)) / 0.7
    distance = np.where(snowman, np.minimum(distance, upper), distance)
    mass = _sigmoid((radius - distance) / 0.015)
    value = _uniform(rng, count, 0.75, 0.95) + 0.04 * texture
    return image + mass * (value - image), mass


def _uniform(rng, count, low, high):
    # float32 throughout: numpy's float64 default doubles the cost of every operation on the images
    return rng.uniform(low, high, (count, 1, 1)).astype(np.float32)


def _ellipse(u, v, cu, cv, ru, rv, angle):
    """Squared elliptical radius: < 1 inside the ellipse centred at (cu, cv), rotated by angle."""
    du, dv = u - cu, v - cv
    cos, sin = np.cos(angle), np.sin(angle)
    return ((cos * du + sin * dv) / ru) ** 2 + ((-sin * du + cos * dv) / rv) ** 2


def _soft_disk(u, v, cu, cv, radius, edge):
    return _sigmoid((radius - np.hypot(u - cu, v - cv)) / edge)


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))


def _smooth_noise(rng: np.random.Generator, count: int, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture: a coarse random grid bilinearly upsampled, as one batched matrix product."""
    coarse = rng.standard_normal((count, cells, cells)).astype(np.float32)
    position = np.linspace(0, cells - 1, size)
    lower = np.floor(position).astype(int).clip(0, cells - 2)
    weight = position - lower
    interpolate = np.zeros((size, cells), np.float32)
    interpolate[np.arange(size), lower] = 1 - weight
    interpolate[np.arange(size), lower + 1] = weight
    return interpolate @ coarse @ interpolate.T


def _blur(images: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Gaussian blur with a per-image sigma in pixels (slight defocus / partial-volume softness)."""
    return np.stack([cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(float(sigma), 1e-3))
                     for image, sigma in zip(images, sigmas)])
