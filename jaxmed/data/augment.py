"""The reference augmentations — rotation, RandomResizedCrop, flips, translation, brightness/contrast — as ONE
affine warp plus one lookup table per image.

torchvision runs Resize → RandomRotation → RandomResizedCrop → flips → ColorJitter, resampling the image four
times. Every geometric step is an affine map, so we compose them into one 2×3 matrix (output pixel → cached
pixel) and resample once with cv2.warpAffine; brightness and contrast compose into one 256-entry table of
intensities (bit-equal to PIL's ImageEnhance), applied with cv2.LUT. Parameters are sampled as torchvision
samples them, in the original image's pixels, so a crop keeps its aspect ratio although the cache stores the
image squashed to a square. Gray images (data.grayscale) are warped as one channel and replicated.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from jaxmed.data.preprocess import Preprocessor


@dataclasses.dataclass(frozen=True)
class Settings:
    rotation: float = 15.0  # degrees, uniform in ±rotation
    scale: tuple[float, float] = (0.8, 1.0)  # crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio, log-uniform
    hflip: bool = True
    vflip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    translate: float = 0.0  # fraction of width / height

    @classmethod
    def from_config(cls, config) -> "Settings":
        """From the `data.augment` ConfigDict (its `enabled` flag is the caller's business)."""
        values = {field.name: config[field.name] for field in dataclasses.fields(cls) if field.name in config}
        for name in ("scale", "ratio"):
            if name in values:
                values[name] = tuple(float(value) for value in values[name])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Params:
    """One image's augmentation, in the original image's pixels (edges at 0 and width/height)."""
    crop: tuple[float, float, float, float]  # x, y, width, height
    angle: float = 0.0  # degrees; positive turns the content counter-clockwise on screen
    shift: tuple[float, float] = (0.0, 0.0)  # x, y
    hflip: bool = False
    vflip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    contrast_first: bool = False  # ColorJitter applies its adjustments in a random order


def sample(rng: np.random.Generator, height: int, width: int, settings: Settings) -> Params:
    return sample_batch(rng, np.array([[height, width]]), settings)[0]


def sample_batch(rng: np.random.Generator, sizes: np.ndarray, settings: Settings) -> list[Params]:
    """Parameters for a batch of images of original (height, width) `sizes`, drawn with a few vectorised calls
    (per-image generator calls would cost more than the warp itself)."""
    count = len(sizes)
    heights, widths = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    angles = rng.uniform(-settings.rotation, settings.rotation, count)
    shifts = np.rint(rng.uniform(-1, 1, (count, 2)) * settings.translate * np.stack([widths, heights], 1))
    crops = resized_crop_boxes(rng, heights, widths, settings.scale, settings.ratio)
    hflips, vflips, contrast_first = rng.random((3, count)) < 0.5
    brightness, contrast = (rng.uniform(max(0.0, 1 - amount), 1 + amount, count)
                            for amount in (settings.brightness, settings.contrast))
    return [Params(crop=tuple(crops[index]), angle=float(angles[index]), shift=tuple(shifts[index]),
                   hflip=bool(settings.hflip and hflips[index]), vflip=bool(settings.vflip and vflips[index]),
                   brightness=float(brightness[index]), contrast=float(contrast[index]),
                   contrast_first=bool(contrast_first[index])) for index in range(count)]


def resized_crop_boxes(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray, scale, ratio,
                       tries: int = 10) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for a batch → (N, 4) x, y, width, height: the first of 10
    tries (random area fraction, log-uniform aspect) that fits, else a central crop clamped to `ratio`."""
    count = len(heights)
    area = (heights * widths)[:, None] * rng.uniform(scale[0], scale[1], (count, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (count, tries)))
    crop_widths, crop_heights = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    fits = ((crop_widths > 0) & (crop_widths <= widths[:, None]) & (crop_heights > 0)
            & (crop_heights <= heights[:, None]))
    first = np.argmax(fits, axis=1)
    crop_widths, crop_heights = crop_widths[np.arange(count), first], crop_heights[np.arange(count), first]
    tops = np.floor(rng.random(count) * (heights - crop_heights + 1))
    lefts = np.floor(rng.random(count) * (widths - crop_widths + 1))
    # None fits in 10 tries: the central crop, as wide as the ratio bounds allow.
    in_ratio = widths / heights
    central_widths = np.where(in_ratio > max(ratio), np.rint(heights * max(ratio)), widths)
    central_heights = np.where(in_ratio < min(ratio), np.rint(widths / min(ratio)), heights)
    boxes = np.stack([lefts, tops, crop_widths, crop_heights], 1)
    central = np.stack([(widths - central_widths) // 2, (heights - central_heights) // 2, central_widths,
                        central_heights], 1)
    return np.where(fits.any(axis=1)[:, None], boxes, central)


def source_matrix(params: Params, original: tuple[int, int], cached: tuple[int, int],
                  output: tuple[int, int]) -> np.ndarray:
    """2×3 matrix taking an output pixel centre to the cached image's pixel coordinates (for WARP_INVERSE_MAP).

    Composed right to left: undo the flips, place the output in the crop box, undo rotation and translation
    about the image centre, then squash original pixels into the cached array's pixels.
    """
    (height, width), (cached_height, cached_width), (out_height, out_width) = original, cached, output
    flip = np.diag([-1.0 if params.hflip else 1.0, -1.0 if params.vflip else 1.0, 1.0])
    flip[:2, 2] = (out_width - 1 if params.hflip else 0, out_height - 1 if params.vflip else 0)
    x, y, crop_width, crop_height = params.crop
    crop = np.array([[crop_width / out_width, 0, x + 0.5 * crop_width / out_width],
                     [0, crop_height / out_height, y + 0.5 * crop_height / out_height], [0, 0, 1]])
    cos, sin = math.cos(math.radians(params.angle)), math.sin(math.radians(params.angle))
    centre_x, centre_y = width / 2 + params.shift[0], height / 2 + params.shift[1]
    unrotate = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    unrotate[:2, 2] = np.array([width / 2, height / 2]) - unrotate[:2, :2] @ np.array([centre_x, centre_y])
    to_cache = np.array([[cached_width / width, 0, -0.5], [0, cached_height / height, -0.5], [0, 0, 1]])
    return (to_cache @ unrotate @ crop @ flip)[:2]


def apply(image: np.ndarray, params: Params, original: tuple[int, int], output: tuple[int, int], *,
          gray: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) cached image → uint8 (*output, 3) augmented image: one warp, one lookup table.

    gray: the three channels are equal (data.grayscale), so one is warped and replicated — a third of the work.
    out: a (*output, 3) array to write into (a row of the batch), saving an allocation and a copy.
    """
    source = np.ascontiguousarray(image[..., 0]) if gray else image
    matrix = source_matrix(params, original, image.shape[:2], output)
    warped = cv2.warpAffine(source, matrix, (output[1], output[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if params.brightness != 1.0 or params.contrast != 1.0:
        warped = adjust_intensity(warped, params.brightness, params.contrast, params.contrast_first)
    if out is None:
        out = np.empty((*output, 3), np.uint8)
    if gray:
        cv2.cvtColor(warped, cv2.COLOR_GRAY2RGB, dst=out)  # 30× faster than numpy's broadcasting copy
    else:
        out[...] = warped
    return out


def adjust_intensity(image: np.ndarray, brightness: float, contrast: float, contrast_first: bool = False
                     ) -> np.ndarray:  # image: (H, W) gray or (H, W, 3)
    """ColorJitter's brightness (scale, clip) and contrast (blend with the mean gray level, clip), in either
    order, as ONE lookup table: the mean the contrast step needs is read off the channel histograms, so the
    clipping of the first step is honoured without touching the image twice."""
    channels = 1 if image.ndim == 2 else 3
    histograms = [cv2.calcHist([image], [channel], None, [256], [0, 256]).reshape(-1) for channel in range(channels)]
    weights = (1.0,) if channels == 1 else (0.299, 0.587, 0.114)  # PIL's gray level of an RGB pixel
    pixels = image.shape[0] * image.shape[1]
    table = np.arange(256, dtype=np.float32)
    for step in ("contrast", "brightness") if contrast_first else ("brightness", "contrast"):
        # PIL's blend, to the bit: float32 factor, truncated to uint8 after each step.
        if step == "brightness":
            table = np.float32(brightness) * table
        else:
            mean = sum(weight * float(histogram @ table) for weight, histogram
                       in zip(weights, histograms)) / pixels  # of the image as it is now, like PIL
            gray = np.float32(int(mean + 0.5))
            table = gray + np.float32(contrast) * (table - gray)
        table = np.trunc(np.clip(table, 0, 255))
    return cv2.LUT(image, table.astype(np.uint8))


def eval_box(preprocessor: Preprocessor, height: int, width: int) -> tuple[float, float, float, float]:
    """The region of an original (height, width) image that the HF processor's resize + centre crop keeps."""
    resized_height, resized_width = (preprocessor.resize_size(height, width) if preprocessor.do_resize
                                     else (height, width))
    crop_height, crop_width = preprocessor.output_size(height, width)
    top, left = (resized_height - crop_height) // 2, (resized_width - crop_width) // 2
    scale_y, scale_x = height / resized_height, width / resized_width
    return left * scale_x, top * scale_y, crop_width * scale_x, crop_height * scale_y
