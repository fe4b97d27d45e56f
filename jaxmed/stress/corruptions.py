"""Acquisition artefacts at five severities, applied to uint8 images: what another scanner, protocol or patient
would do to them. MRI artefacts come from torchio (the `stress` extra), on 2-D images given as (C, H, W, 1)
tensors; the X-ray / generic ones from PIL and OpenCV. Every corruption is deterministic by (seed, image index).

Severities are in units of the image (fractions of the side, of the 0–1 intensity range), so a 48-pixel phantom
and a 512-pixel scan are hurt alike.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable

import cv2
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Corruption:
    name: str
    kind: str  # "MRI" or "generic"
    levels: tuple  # the strength at severities 1..5
    apply: Callable  # (float image HxW in [0, 1], strength, rng) → float image
    needs: str = ""  # the optional package it uses, for the error when it is missing


def _torchio(transform_of: Callable) -> Callable:
    """An image → image function running the torchio transform built by `transform_of(strength, rng, shape)`, with
    torch's generator seeded from `rng` (torchio draws its random parameters there)."""
    def apply(image, strength, rng):
        import torch
        import torchio

        torch.manual_seed(int(rng.integers(2**31)))
        tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, :, :, None]
        out = transform_of(strength, rng, image.shape)(torchio.ScalarImage(tensor=tensor)).data
        return out[0, :, :, 0].numpy()
    return apply


def _bias_field(strength, rng, shape):
    import torchio
    return torchio.RandomBiasField(coefficients=strength, order=3)


def _motion(strength, rng, shape):
    import torchio  # degrees, and a translation in pixels (unit spacing): a fraction of the side
    return torchio.RandomMotion(degrees=strength * 20, translation=strength * 0.1 * shape[0], num_transforms=2)


def _ghosting(strength, rng, shape):
    import torchio
    return torchio.RandomGhosting(num_ghosts=(4, 10), axes=(0, 1), intensity=(strength, strength))


def _spike(strength, rng, shape):
    import torchio
    return torchio.RandomSpike(num_spikes=1, intensity=(strength, strength))


def _gamma(strength, rng, shape):
    import torchio
    sign = 1 if rng.random() < 0.5 else -1
    return torchio.RandomGamma(log_gamma=(sign * strength, sign * strength))


def _blur(image, strength, rng):
    sigma = strength * image.shape[0]
    return cv2.GaussianBlur(image, (0, 0), sigma)


def _rician(image, strength, rng):
    noise = rng.standard_normal((2,) + image.shape).astype(np.float32) * strength
    return np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)


def _gaussian(image, strength, rng):
    return image + rng.standard_normal(image.shape).astype(np.float32) * strength


def _jpeg(image, quality, rng):
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image)).save(buffer, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buffer), np.float32) / 255


def _downsample(image, factor, rng):
    height, width = image.shape
    small = cv2.resize(image, (max(1, round(width / factor)), max(1, round(height / factor))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _contrast(image, factor, rng):
    return (image - image.mean()) * factor + image.mean()


def _brightness(image, shift, rng):
    return image + (shift if rng.random() < 0.5 else -shift)


def _rotation(image, degrees, rng):
    height, width = image.shape
    angle = degrees if rng.random() < 0.5 else -degrees
    matrix = cv2.getRotationMatrix2D((width / 2 - 0.5, height / 2 - 0.5), angle, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0.0)


CORRUPTIONS = (
    Corruption("bias_field", "MRI", (0.1, 0.2, 0.35, 0.5, 0.7), _torchio(_bias_field), "torchio"),
    Corruption("motion", "MRI", (0.05, 0.1, 0.2, 0.3, 0.45), _torchio(_motion), "torchio"),
    Corruption("ghosting", "MRI", (0.15, 0.3, 0.5, 0.7, 0.9), _torchio(_ghosting), "torchio"),
    Corruption("spike", "MRI", (0.2, 0.4, 0.7, 1.0, 1.5), _torchio(_spike), "torchio"),
    Corruption("gamma", "MRI", (0.1, 0.2, 0.35, 0.5, 0.7), _torchio(_gamma), "torchio"),
    Corruption("rician_noise", "MRI", (0.02, 0.04, 0.07, 0.1, 0.15), _rician),
    Corruption("gaussian_noise", "generic", (0.02, 0.04, 0.07, 0.1, 0.15), _gaussian),
    Corruption("blur", "generic", (0.008, 0.013, 0.02, 0.03, 0.045), _blur),
    Corruption("jpeg", "generic", (60, 40, 25, 15, 8), _jpeg),
    Corruption("downsample", "generic", (1.5, 2, 3, 4, 6), _downsample),
    Corruption("contrast", "generic", (0.8, 0.65, 0.5, 0.35, 0.2), _contrast),
    Corruption("brightness", "generic", (0.08, 0.16, 0.25, 0.35, 0.45), _brightness),
    Corruption("rotation", "generic", (3, 6, 9, 12, 15), _rotation),
)
BY_NAME = {corruption.name: corruption for corruption in CORRUPTIONS}
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(images: np.ndarray, corruption: Corruption, severity: int, seed: int) -> np.ndarray:
    """uint8 (N, H, W, C) → the same images with the corruption at `severity` (0: unchanged). Each image draws from
    its own generator seeded by (seed, corruption, index) — the same direction, position and noise pattern at every
severity, so only the strength grows.
    Grayscale images (equal channels) are corrupted once and stay grayscale; colour ones per channel alike."""
    images = np.asarray(images)
    if severity == 0:
        return images.copy()
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity}: choose 0 (clean) or one of {SEVERITIES}")
    strength = corruption.levels[severity - 1]
    code = CORRUPTIONS.index(corruption)
    out = np.empty_like(images)
    for index, image in enumerate(images):
        gray = image.ndim == 2 or bool(np.all(image == image[..., :1]))
        channels = [image if image.ndim == 2 else image[..., 0]] if gray else [image[..., c] for c in
                                                                            range(image.shape[-1])]
        done = []
        for channel in channels:
            # one draw per image for every severity and channel: only the strength grows with severity
            rng = np.random.default_rng([seed, code, index])
            done.append(_to_uint8(corruption.apply(channel.astype(np.float32) / 255, strength, rng)))
        result = done[0] if image.ndim == 2 else np.stack(done * (image.shape[-1] if gray else 1), axis=-1)
        out[index] = result
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
