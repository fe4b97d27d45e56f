"""Input hygiene: any image a user's dataset holds becomes an 8-bit gray or RGB PIL image, or a clear reason why not.

Grayscale, palette, RGBA, CMYK, 16-bit and EXIF-rotated files all arrive in our datasets; models need one layout,
and `grayscale=True` removes the colour-mode shortcut (in BRISC the file's colour mode follows the class).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxmed.data import dicom, nifti
from jaxmed.errors import UnreadableImage  # noqa: F401 (re-exported: callers catch decode.UnreadableImage)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                            ".ppm", ".pbm", ".pnm", ".dcm"})
# Side of the square a JPEG may be decoded down to (DCT scaling), set by `reduced_scale`; 0 = full size.
_reduce_to = contextvars.ContextVar("jaxmed_reduce_to", default=0)
# Files and folders that operating systems and notebooks leave in datasets; they are never data.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "__macosx", ".ipynb_checkpoints"})


def is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def is_image_name(name: str) -> bool:
    """An image file's name, or a NIfTI volume's (.nii, .nii.gz: sources expand those into slices, nifti.py)."""
    return not is_junk(name) and (Path(name).suffix.lower() in IMAGE_SUFFIXES or nifti.is_nifti_name(name))


def is_image_file(path: str | Path) -> bool:
    """An image by its name, or a DICOM file by its 'DICM' preamble when the name says nothing: PACS exports name
    files IM000001 or by their SOP Instance UID (1.2.840.…, whose "suffix" is digits). Only those are opened."""
    path = Path(path)
    if is_junk(path.name):
        return False
    if is_image_name(path.name):
        return True
    if path.suffix and not path.suffix[1:].isdigit():
        return False
    return dicom.is_dicom(path)


def open_image(data: str | Path | bytes, *, dicom_frame: int = -1) -> Image.Image:
    """Fully decodes a file path or encoded bytes (so truncation is caught here, not mid-epoch). DICOM goes through
    dicom.read (display windowing; `dicom_frame` of a multi-frame file, -1 = the middle one) to "L" or "RGB"."""
    if dicom.is_dicom(data):
        return Image.fromarray(dicom.read(data, frame=dicom_frame))
    try:
        handle = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
        with handle:
            if not handle.read(1):
                raise UnreadableImage("empty file (0 bytes)")
            handle.seek(0)
            image = Image.open(handle)
            _draft(image)
            image.load()
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not an image format PIL can read (wrong content or random bytes)") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        reason = str(error) or type(error).__name__
        raise UnreadableImage(f"{type(error).__name__}: {reason}") from None
    if image.width < 1 or image.height < 1:
        raise UnreadableImage(f"empty image ({image.width}x{image.height})")
    return image


@contextlib.contextmanager
def reduced_scale(side: int):
    """Inside, `open_image` decodes JPEGs at the smallest DCT scale (1/2, 1/4 or 1/8: libjpeg's scaled IDCT) that
    keeps both sides ≥ `side` — a 2048² X-ray cached at 256 px decodes ~10× faster; 0 = full size. Per thread."""
    token = _reduce_to.set(side)
    try:
        yield
    finally:
        _reduce_to.reset(token)


def draftable(image: Image.Image, side: int) -> bool:
    """Whether `reduced_scale(side)` decodes this (opened, not yet loaded or original-size) file smaller."""
    width, height = original_size(image)
    return image.format == "JPEG" and side > 0 and min(width // side, height // side) >= 2


def _draft(image: Image.Image) -> None:
    side = _reduce_to.get()
    if side and image.format == "JPEG" and draftable(image, side):
        original = image.size
        image.draft(image.mode, (side, side))
        image.info["original_size"] = original


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the file before any reduced-scale decoding (after EXIF rotation, once cleaned)."""
    return tuple(image.info.get("original_size", image.size))


def clean(image: Image.Image | np.ndarray, *, grayscale: bool) -> Image.Image:
    """Any PIL image or (H,W), (H,W,1|3|4) array → an upright 8-bit PIL image: mode "L" if grayscale (its
    channel is replicated to 3 when stored; resizing one channel is a third of the work), else "RGB"."""
    original = None
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    else:
        original, size = image.info.get("original_size"), image.size
        image = ImageOps.exif_transpose(image)
        if original and image.size != size:  # rotated by 90°: so is the original size
            original = original[::-1]
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _array_to_pil(np.asarray(image))
    mode = "L" if grayscale else "RGB"
    image = image if image.mode == mode else image.convert(mode)
    if original:
        image.info["original_size"] = tuple(original)
    return image


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise UnreadableImage(f"array of shape {array.shape} is not an image (H,W), (H,W,1), (H,W,3) or (H,W,4)")
    if array.dtype != np.uint8:
        array = _stretch_to_uint8(array)
    return Image.fromarray(np.ascontiguousarray(array))


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    # 16-bit medical images often hold 10-12 bit data: dividing by 65535 would make them black, so use their range.
    values = array.astype(np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    if not np.isfinite(low) or not np.isfinite(high):
        raise UnreadableImage("image has no finite pixel values")
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.rint((values - low) * scale).astype(np.uint8)
