"""Model preprocessing that reproduces the HF image processor named in a preprocessor_config.json.

Geometry (resize, crop) happens on uint8 images with PIL — exactly the operations of transformers' PIL backend,
which is what `AutoImageProcessor` runs without torchvision — and normalisation is a separate float step, so the
data pipeline can cache uint8 pixels and normalise on the fly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from jaxmed.errors import JaxmedError

# HF processor classes whose geometry we reproduce (the PIL/"slow" and torchvision/"fast" names alike).
SUPPORTED = ("ViTImageProcessor", "ConvNextImageProcessor", "EfficientNetImageProcessor", "DeiTImageProcessor",
             "BitImageProcessor")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    processor_type: str
    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = Image.Resampling.BILINEAR
    crop_pct: float | None = None  # ConvNext-style: resize shortest edge to size/crop_pct, then centre-crop
    do_center_crop: bool = False
    crop_size: dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    rescale_offset: bool = False  # EfficientNet: rescale to [-1, 1] instead of [0, 1]
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    include_top: bool = False  # EfficientNet: divides by std a second time (HF does; keras' original did too)

    @classmethod
    def from_config(cls, config: dict) -> "Preprocessor":
        kind = config.get("image_processor_type", "").removesuffix("Fast").removesuffix("Pil")
        if kind not in SUPPORTED:
            raise JaxmedError(f"image processor {config.get('image_processor_type')!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(values[key]) if isinstance(values[key], (list, tuple)) else (values[key],) * 3
        if kind == "ConvNextImageProcessor" and values.get("crop_pct") is None:
            values["crop_pct"] = 224 / 256
        if kind != "EfficientNetImageProcessor":
            values.pop("include_top", None)
            values.pop("rescale_offset", None)
        else:
            values.setdefault("include_top", True)
        return cls(processor_type=kind, **values)

    @classmethod
    def from_pretrained(cls, directory) -> "Preprocessor":
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise JaxmedError(f"no preprocessor_config.json in {directory}")
        return cls.from_config(json.loads(path.read_text()))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of `geometry`'s output for an input of the given size."""
        h, w = self.resize_size(height, width) if self.do_resize else (height, width)
        if self.crop is not None:
            h, w = self.crop
        return h, w

    @property
    def crop(self) -> tuple[int, int] | None:
        if self.processor_type == "ConvNextImageProcessor" and self.do_resize and self.size["shortest_edge"] < 384:
            return self.size["shortest_edge"], self.size["shortest_edge"]
        if self.do_center_crop and self.crop_size:
            return self.crop_size["height"], self.crop_size["width"]
        return None

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.size
        if self.processor_type == "ConvNextImageProcessor":
            edge = size["shortest_edge"]
            if edge >= 384:
                return edge, edge
            return _shortest_edge_size(height, width, int(edge / self.crop_pct))
        if "shortest_edge" in size:
            return _shortest_edge_size(height, width, size["shortest_edge"])
        return size["height"], size["width"]

    def geometry(self, image) -> np.ndarray:
        """uint8 HWC RGB (or a PIL image) → resized and cropped uint8 HWC, as the HF processor does it."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        if self.do_resize:
            h, w = self.resize_size(pil.height, pil.width)
            pil = pil.resize((w, h), resample=Image.Resampling(self.resample))
        array = np.asarray(pil)
        if self.crop is not None:
            array = center_crop(array, *self.crop)
        return array

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., H, W, 3) → float32 model input; works on numpy and jax arrays alike."""
        x = pixels.astype(np.float32)
        if self.do_rescale:
            x = x * np.float32(self.rescale_factor)
            if self.rescale_offset:
                x = x - np.float32(1.0)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        if self.include_top:
            x = x / np.asarray(self.image_std, np.float32)
        return x

    def __call__(self, image) -> np.ndarray:
        return self.normalize(self.geometry(image))


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    # transformers.image_transforms.get_resize_output_image_size(default_to_square=False)
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = edge, int(edge * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop: floor offsets; zero-pad (centred, ceil) when the image is smaller."""
    h, w = array.shape[:2]
    if crop_h > h or crop_w > w:
        new_h, new_w = max(h, crop_h), max(w, crop_w)
        padded = np.zeros((new_h, new_w) + array.shape[2:], array.dtype)
        top, left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded[top:top + h, left:left + w] = array
        array, h, w = padded, new_h, new_w
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return array[top:top + crop_h, left:left + crop_w]
