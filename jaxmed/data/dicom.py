"""DICOM files (CT, MR, X-ray, ultrasound...) as 8-bit images, displayed the way radiology viewers display them.

Stored values are not display values: the modality LUT (RescaleSlope/Intercept, e.g. to Hounsfield units) comes
first, then the VOI LUT or the window the file recommends (the first of several), else the values' own range;
MONOCHROME1 is inverted after that, palette colour goes through its palette and YBR becomes RGB. Multi-frame files
give one frame (the middle one unless told). Anything that is not an image becomes `UnreadableImage` with
a reason a person can act on. pydicom is imported only when a DICOM file turns up.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from jaxmed.errors import UnreadableImage

PREAMBLE_LENGTH = 128  # the 'DICM' magic follows a 128-byte preamble (PS3.10 7.1)
PLUGIN_HINT = "pip install 'jaxmed[dicom]' (pylibjpeg and its JPEG / JPEG 2000 plugins)"
# Enhanced multi-frame objects keep rescale and window per frame in functional groups, not at the top level.
FUNCTIONAL_GROUP_TAGS = {"PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
                         "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction")}


def is_dicom(data: str | Path | bytes) -> bool:
    """A `.dcm` name, or the 'DICM' magic at byte 128 (only 132 bytes are read)."""
    if isinstance(data, bytes):
        return data[PREAMBLE_LENGTH:PREAMBLE_LENGTH + 4] == b"DICM"
    if Path(data).suffix.lower() == ".dcm":
        return True
    try:
        with open(data, "rb") as handle:
            return handle.read(PREAMBLE_LENGTH + 4)[PREAMBLE_LENGTH:] == b"DICM"
    except OSError:
        return False


def read(data: str | Path | bytes, frame: int = -1) -> np.ndarray:
    """uint8 (H, W) gray or (H, W, 3) RGB display image of one frame (-1: the middle one, index n // 2)."""
    from pydicom import pixels

    dataset = _read_dataset(data)
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableImage(_no_pixels_reason(dataset))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frame == -1:
        frame = frames // 2
    if not 0 <= frame < frames:
        raise UnreadableImage(f"frame {frame} asked for (data.dicom_frame) but the file has {frames} "
                                     f"frame(s), 0..{frames - 1}; use -1 for the middle one")
    _check_decoder(dataset, pixels)
    try:
        stored = pixels.pixel_array(dataset, index=frame)  # YBR_* comes back as RGB (as_rgb=True)
    except (ValueError, EOFError) as error:  # pydicom: "number of bytes of pixel data is less than expected"
        raise UnreadableImage(f"truncated or corrupt DICOM pixel data: {error}") from None
    except Exception as error:
        raise UnreadableImage(f"cannot decode the DICOM pixel data ({type(error).__name__}: {error})") from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _palette(stored, dataset, pixels)
    if stored.ndim == 3:
        if stored.shape[2] != 3:
            raise UnreadableImage(f"{stored.shape[2]} samples per pixel ({photometric}): only gray, RGB, "
                                         "YBR and palette colour DICOM images are supported")
        # Colour values are intensities on the stored bit depth; LUTs and windows are for gray images only.
        top = 2 ** int(dataset.get("BitsStored", stored.dtype.itemsize * 8)) - 1
        return _to_uint8(stored.astype(np.float64) * 255.0 / top)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadableImage(f"photometric interpretation {photometric!r} is not supported")
    _lift_functional_groups(dataset, frame)
    display = _display_gray(pixels.apply_modality_lut(stored, dataset), dataset, pixels)
    if photometric == "MONOCHROME1":  # minimum is white (PS3.3 C.7.6.3.1.2); inverted after the window
        display = 255.0 - display
    return _to_uint8(display)


def _read_dataset(data: str | Path | bytes):
    import pydicom

    try:
        handle = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
        with handle:
            head = handle.read(PREAMBLE_LENGTH + 4)
            if not head:
                raise UnreadableImage("empty file (0 bytes)")
            handle.seek(0)
            # Old `.dcm` files without the preamble are still DICOM datasets; force=True reads those.
            dataset = pydicom.dcmread(handle, force=head[PREAMBLE_LENGTH:] != b"DICM")
            if "TransferSyntaxUID" not in dataset.file_meta and dataset.original_encoding[1] is not None:
                implicit, little = dataset.original_encoding
                if little:
                    dataset.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit
                                                           else pydicom.uid.ExplicitVRLittleEndian)
            return dataset
    except UnreadableImage:
        raise
    except Exception as error:
        raise UnreadableImage(f"not a readable DICOM file ({type(error).__name__}: {error})") from None


def _no_pixels_reason(dataset) -> str:
    if not any(tag in dataset for tag in ("SOPClassUID", "Modality", "Rows")):  # force-read garbage, or nothing
        return ("no DICOM data elements that describe an object (SOP Class UID, Modality, Rows): the file is cut "
                "off in its header, or it is not DICOM although its name says so")
    sop_class = dataset.get("SOPClassUID")
    sop_name = getattr(sop_class, "name", str(sop_class or "unknown"))
    modality = dataset.get("Modality", "unknown")
    if "Image" in sop_name or "Rows" in dataset:  # the header promises an image that is not there
        return (f"no pixel data although the header describes an image (SOP class {sop_name}, Modality "
                f"{modality}): the file is probably truncated; copy it again")
    return f"no pixel data (SOP class {sop_name}, Modality {modality}: not an image)"


def _check_decoder(dataset, pixels) -> None:
    """Says which transfer syntax cannot be decoded and what to install, before pydicom's longer messages."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise UnreadableImage("the DICOM file names no transfer syntax (0002,0010) and its encoding cannot "
                                     "be guessed; rewrite it with a file meta header (e.g. dcmconv, gdcmconv)")
    described = f"transfer syntax {syntax.name} ({syntax})"
    try:
        decoder = pixels.get_decoder(syntax)
    except NotImplementedError:
        raise UnreadableImage(f"{described} cannot be decoded by pydicom; convert the file to an "
                                     "uncompressed one (e.g. gdcmconv --raw, dcmdjpeg)") from None
    if decoder.is_encapsulated and not decoder.available_plugins:
        missing = "; ".join(decoder.missing_dependencies)
        raise UnreadableImage(f"{described} needs a decoder plugin that is not installed ({missing}): "
                                     f"{PLUGIN_HINT}")


def _lift_functional_groups(dataset, frame: int) -> None:
    """Copies an enhanced object's per-frame (else shared) rescale and window onto the top level, where the
    classic single-frame objects keep them and where pydicom's modality LUT looks."""
    groups = [dataset.get("PerFrameFunctionalGroupsSequence"), dataset.get("SharedFunctionalGroupsSequence")]
    groups = [sequence[frame if index == 0 else 0] for index, sequence in enumerate(groups)
              if sequence and len(sequence) > (frame if index == 0 else 0)]
    for group in groups:  # per-frame first: what it sets, the shared group does not override
        for sequence_name, tags in FUNCTIONAL_GROUP_TAGS.items():
            sequence = group.get(sequence_name)
            for tag in tags if sequence else ():
                if tag in sequence[0] and tag not in dataset:
                    setattr(dataset, tag, sequence[0][tag].value)


def _display_gray(values: np.ndarray, dataset, pixels) -> np.ndarray:
    """Modality values → float display values in 0..255: the VOI LUT, else the first window, else min–max."""
    # pydicom's default (prefer_lut=True): when a file has both, the VOI LUT is the more specific one.
    if dataset.get("VOILUTSequence"):
        item = dataset.VOILUTSequence[0]
        entries, first_value = (item.LUTDescriptor[0] or 2 ** 16), item.LUTDescriptor[1]
        table = pixels.apply_voi(np.arange(first_value, first_value + entries), dataset)
        # The output range is the bits the table uses: files often say 16 bits and hold 12 (dcmtk does the same).
        top = 2 ** max(int(table.max()).bit_length(), 1) - 1
        return pixels.apply_voi(np.rint(values).astype(np.int64), dataset).astype(np.float64) * 255.0 / top
    window = _first_window(dataset)
    if window is not None:
        return _window(values.astype(np.float64), *window)
    return _min_max(values.astype(np.float64))


def _first_window(dataset) -> tuple[float, float, str] | None:
    center, width = _first_value(dataset, "WindowCenter"), _first_value(dataset, "WindowWidth")
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if center is None or width is None:
        return None
    # A width the function cannot use (LINEAR needs >= 1, the others > 0) is a broken tag: use the data range.
    if width < (1 if function not in ("LINEAR_EXACT", "SIGMOID") else np.finfo(float).tiny):
        return None
    return center, width, function


def _first_value(dataset, tag: str) -> float | None:
    value = dataset.get(tag)
    if value is not None and not isinstance(value, (int, float, str)):
        value = value[0] if len(value) else None  # several windows: the first is the file's default
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):  # an unparsable tag counts as absent
        return None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3 (LINEAR_EXACT, SIGMOID), with the output range 0..255."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        position = (values - center) / width + 0.5
    else:  # LINEAR, the default (also for unknown functions, as viewers do)
        center, width = center - 0.5, width - 1.0
        position = (values - center) / width + 0.5 if width > 0 else (values > center).astype(np.float64)
    return np.clip(position, 0.0, 1.0) * 255.0


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = np.nanmin(values), np.nanmax(values)
    if not np.isfinite(low) or not np.isfinite(high):
        raise UnreadableImage("DICOM image has no finite pixel values")
    return (values - low) * (255.0 / (high - low) if high > low else 0.0)


def _palette(stored: np.ndarray, dataset, pixels) -> np.ndarray:
    try:
        colours = pixels.apply_color_lut(stored, dataset)
    except Exception as error:
        raise UnreadableImage(f"PALETTE COLOR image with an unusable palette ({error})") from None
    bits = int(dataset.get("RedPaletteColorLookupTableDescriptor", [0, 0, colours.dtype.itemsize * 8])[2])
    return _to_uint8(colours.astype(np.float64) * 255.0 / (2 ** bits - 1))


def _to_uint8(display: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(display), 0, 255).astype(np.uint8))
