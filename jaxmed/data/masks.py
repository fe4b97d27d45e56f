"""Lesion masks beside a split's images, on the model's eval grid: what the explanation checks measure localisation
against. The synthetic phantoms know theirs; a folder dataset may give them as PNGs under `data.mask_root` with the
images' relative paths (BRISC ships segmentation masks that way).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from jaxmed.data import synthetic
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

MASK_SUFFIXES = (".png", ".PNG", ".tif", ".bmp")


def lesion_masks(config, ids: list[str], preprocessor: Preprocessor, shape: tuple[int, int]) -> np.ndarray | None:
    """bool (N, H, W) masks for the images `ids`, resized and cropped exactly as their eval images were; None when
    the data has no masks. An image without a mask file gets an empty mask (a no-tumour image, usually)."""
    if config.format == "synthetic":
        masks = [_synthetic_mask(config.synthetic, image_id) for image_id in ids]
    elif config.get("mask_root"):
        masks = [_file_mask(Path(config.root).expanduser(), Path(config.mask_root).expanduser(), image_id)
                 for image_id in ids]
    else:
        return None
    return np.stack([np.zeros(shape, bool) if mask is None else _on_eval_grid(mask, preprocessor, shape)
                     for mask in masks])


def _synthetic_mask(settings, image_id: str) -> np.ndarray:
    # ids read "synthetic:<split>/<class>/<index>", the index into generate()'s class-sorted output
    split, _, index = image_id.removeprefix("synthetic:").split("/")
    per_class = {"train": settings.train_per_class, "test": settings.test_per_class}[split]
    return _synthetic_masks(split, per_class, settings.size, settings.seed)[int(index)]


@functools.lru_cache(maxsize=2)
def _synthetic_masks(split: str, per_class: int, size: int, seed: int) -> np.ndarray:
    return synthetic.generate_with_masks(split, per_class, size, seed)[3]


def _file_mask(root: Path, mask_root: Path, image_id: str) -> np.ndarray | None:
    if not mask_root.is_dir():
        raise JaxmedError(f"data.mask_root={str(mask_root)!r} is not a directory; it should hold one mask image per "
                          "image, at the image's path relative to data.root")
    try:
        relative = Path(image_id).relative_to(root)
    except ValueError:
        raise JaxmedError(f"image {image_id} is not under data.root={str(root)!r}, so its mask path under "
                          "data.mask_root cannot be found") from None
    candidates = [mask_root / relative] + [(mask_root / relative).with_suffix(s) for s in MASK_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return np.asarray(Image.open(path).convert("L")) > 0
    return None


def _on_eval_grid(mask: np.ndarray, preprocessor: Preprocessor, shape: tuple[int, int]) -> np.ndarray:
    """The mask through the processor's resize and crop (bilinear, as the image), thresholded at half."""
    grey = np.repeat((np.asarray(mask, np.uint8) * 255)[..., None], 3, axis=-1)
    grid = preprocessor.geometry(grey)[..., 0] >= 128
    if grid.shape != tuple(shape):
        raise JaxmedError(f"a mask resized to {grid.shape} does not match its image's {tuple(shape)}: masks must have "
                          "their image's size")
    return grid
