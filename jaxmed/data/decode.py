"""Input hygiene: any image a user's dataset holds becomes an 8-bit gray or RGB PIL image, or a clear reason why not.

Grayscale, palette, RGBA, CMYK, 16-bit and EXIF-rotated files all arrive in our datasets; models need one layout,
and `grayscale=True` removes the colour-mode shortcut (in BRISC the file's colour mode follows the class).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxmed.data import dicom, nifti
from jaxmed.errors import UnreadableImage  # noqa: F401 (re-exported: callers catch decode.UnreadableImage)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                            ".ppm", ".pbm", ".pnm", ".dcm"})
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


def clean(image: Image.Image | np.ndarray, *, grayscale: bool) -> Image.Image:
    """Any PIL image or (H,W), (H,W,1|3|4) array → an upright 8-bit PIL image: mode "L" if grayscale (its
    channel is replicated to 3 when stored; resizing one channel is a third of the work), else "RGB"."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _array_to_pil(np.asarray(image))
    mode = "L" if grayscale else "RGB"
    return image if image.mode == mode else image.convert(mode)


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
