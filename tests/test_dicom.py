"""DICOM reading (jaxmed.data.dicom) against pydicom's own test files and small files written here, each output
compared with an independent computation from the stored values and the tags; and a class-folder DICOM dataset
(RSNA style) loaded through load_dataset."""

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from jaxmed.data import decode, default_config, dicom, load_dataset
from jaxmed.data.preprocess import Preprocessor

VIT = Preprocessor(processor_type="ViTImageProcessor", size={"height": 16, "width": 16})


def sample(name):  # only names pydicom ships offline: any other name makes it try a download
    return get_testdata_file(name)


def expected_gray(stored, slope=1.0, intercept=0.0, center=None, width=None, monochrome1=False):
    """Display values written out from the standard's case analysis, PS3.3 C.11.2.1.2.1 (LINEAR, y 0..255)."""
    values = stored.astype(np.float64) * slope + intercept
    if center is None:
        display = (values - values.min()) / (values.max() - values.min()) * 255
    else:
        low_edge, high_edge = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        display = np.where(values <= low_edge, 0.0,
                           np.where(values > high_edge, 255.0, ((values - (center - 0.5)) / (width - 1) + 0.5) * 255))
    return 255 - display if monochrome1 else display


def assert_close(actual, expected, tolerance=1):
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert np.abs(actual.astype(np.float64) - expected).max() <= tolerance


def write_dicom(path, stored, *, preamble=True, photometric="MONOCHROME2", **tags):
    """A CT image file of `stored` (frames, rows, columns) or (rows, columns), Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        dataset.NumberOfFrames = stored.shape[0]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated = dataset.BitsStored = stored.dtype.itemsize * 8
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = int(np.issubdtype(stored.dtype, np.signedinteger))
    dataset.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    for tag, value in tags.items():
        setattr(dataset, tag, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=preamble)
    return path


def ramp(low, high, dtype, shape=(8, 16)):
    return np.linspace(low, high, shape[0] * shape[1]).round().astype(dtype).reshape(shape)


# ------------------------------------------------------------------------------------------ pydicom's files

def test_ct_small_rescale_then_min_max():
    dataset = pydicom.dcmread(sample("CT_small.dcm"))
    assert "WindowCenter" not in dataset and float(dataset.RescaleIntercept) == -1024
    assert_close(dicom.read(sample("CT_small.dcm")),
                 expected_gray(dataset.pixel_array, float(dataset.RescaleSlope), float(dataset.RescaleIntercept)))


def test_mr_small_uses_its_window():
    dataset = pydicom.dcmread(sample("MR_small.dcm"))
    image = dicom.read(sample("MR_small.dcm"))
    assert_close(image, expected_gray(dataset.pixel_array, center=600.0, width=1600.0))
    assert image.max() == 255 and image.min() > 0  # the window (−200..1400) clips the top, not min–max


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_compressed_mr_equals_uncompressed(name):
    np.testing.assert_array_equal(dicom.read(sample(name)), dicom.read(sample("MR_small.dcm")))


def test_jpeg2000_without_window_is_min_max():
    dataset = pydicom.dcmread(sample("JPEG2000.dcm"))
    assert_close(dicom.read(sample("JPEG2000.dcm")), expected_gray(dataset.pixel_array))


def test_missing_decoder_plugin_names_syntax_and_install_command(monkeypatch):
    decoder = pydicom.pixels.get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if neither Pillow's nor pylibjpeg's plugin were installed
    with pytest.raises(decode.UnreadableImage, match=r"JPEG 2000 Image Compression \(Lossless Only\).*"
                                                     r"pip install 'jaxmed\[dicom\]'"):
        dicom.read(sample("MR_small_jp2klossless.dcm"))


def test_transfer_syntax_without_any_decoder(tmp_path):
    dataset = pydicom.dcmread(sample("MR_small.dcm"))
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    dataset.PixelData = pydicom.encaps.encapsulate([b"\0" * 16])
    dataset.save_as(tmp_path / "video.dcm")
    with pytest.raises(decode.UnreadableImage, match="MPEG2 Main Profile.*cannot be decoded by pydicom; convert"):
        dicom.read(tmp_path / "video.dcm")


def test_multiframe_ybr_gives_middle_frame_as_rgb():
    path = sample("examples_ybr_color.dcm")
    ybr = pydicom.pixels.pixel_array(path, index=15, as_rgb=False).astype(np.float64)
    luma, blue, red = ybr[..., 0], ybr[..., 1] - 128, ybr[..., 2] - 128  # YBR_FULL → RGB, PS3.3 C.7.6.3.1.2
    rgb = np.stack([luma + 1.402 * red, luma - 0.344136 * blue - 0.714136 * red, luma + 1.772 * blue], -1)
    image = dicom.read(path)
    assert image.shape == (240, 320, 3)
    assert_close(image, np.clip(rgb, 0, 255), tolerance=2)
    first = dicom.read(path, frame=0)
    assert_close(first, pydicom.pixels.pixel_array(path, index=0).astype(np.float64), tolerance=0)
    assert not np.array_equal(first, image)
    with pytest.raises(decode.UnreadableImage, match=r"frame 30 .* 30 frame\(s\), 0\.\.29"):
        dicom.read(path, frame=30)


def test_rgb_8_and_16_bit():
    rgb = pydicom.dcmread(sample("SC_rgb_rle.dcm")).pixel_array
    assert_close(dicom.read(sample("SC_rgb_rle.dcm")), rgb.astype(np.float64), tolerance=0)
    frames = pydicom.dcmread(sample("SC_rgb_rle_16bit_2frame.dcm")).pixel_array  # (2, 100, 100, 3) uint16
    assert not np.array_equal(frames[0], frames[1])
    assert_close(dicom.read(sample("SC_rgb_rle_16bit_2frame.dcm")), frames[1] / 65535 * 255)  # middle: 2 // 2
    assert_close(dicom.read(sample("SC_rgb_rle_16bit_2frame.dcm"), frame=0), frames[0] / 65535 * 255)


def test_palette_colour_goes_through_the_palette():
    dataset = pydicom.dcmread(sample("examples_palette.dcm"))
    entries, first, bits = dataset.RedPaletteColorLookupTableDescriptor
    assert bits == 16
    index = np.clip(dataset.pixel_array.astype(np.int64) - first, 0, (entries or 65536) - 1)
    tables = [np.frombuffer(getattr(dataset, f"{colour}PaletteColorLookupTableData"), "<u2")
              for colour in ("Red", "Green", "Blue")]
    image = dicom.read(sample("examples_palette.dcm"))
    assert image.shape == (*dataset.pixel_array.shape, 3)
    # Only rounding separates the two: half a grey level (the top entry 65280 must give 254, not 255).
    assert_close(image, np.stack([table[index] for table in tables], -1) / 65535 * 255, tolerance=0.5)


@pytest.mark.parametrize("name, reason", [
    ("reportsi.dcm", r"no pixel data \(SOP class Basic Text SR Storage, Modality SR: not an image\)"),
    ("rtplan.dcm", r"no pixel data \(SOP class RT Plan Storage, Modality RTPLAN: not an image\)"),
    ("MR_truncated.dcm", r"truncated or corrupt DICOM pixel data: .*less than expected \(8130 vs 8192 bytes\)")])
def test_not_images_say_why(name, reason):
    with pytest.raises(decode.UnreadableImage, match=reason):
        decode.open_image(sample(name))


def test_cut_off_bytes_and_empty_file(tmp_path):
    raw = open(sample("CT_small.dcm"), "rb").read()
    assert decode.open_image(raw).mode == "L"  # bytes work like paths
    with pytest.raises(decode.UnreadableImage, match="header describes an image.*probably truncated"):
        dicom.read(raw[:2000])  # the header ends before the pixel data element
    (tmp_path / "junk.dcm").write_bytes(b"x" * 100)
    with pytest.raises(decode.UnreadableImage, match="no DICOM data elements"):
        dicom.read(tmp_path / "junk.dcm")
    (tmp_path / "empty.dcm").touch()
    with pytest.raises(decode.UnreadableImage, match=r"empty file \(0 bytes\)"):
        decode.open_image(tmp_path / "empty.dcm")


# ------------------------------------------------------------------------------- corner cases written here

def test_monochrome1_is_inverted_after_the_window(tmp_path):
    stored = ramp(0, 4095, np.uint16)
    tags = {"WindowCenter": 2000, "WindowWidth": 3000}
    image = dicom.read(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **tags))
    assert_close(image, expected_gray(stored, center=2000, width=3000, monochrome1=True))
    normal = dicom.read(write_dicom(tmp_path / "m2.dcm", stored, **tags))
    np.testing.assert_array_equal(image.astype(int), 255 - normal.astype(int))


def test_signed_16_bit_hounsfield_window(tmp_path):
    stored = ramp(-2000, 3000, np.int16)  # below −1024 HU: padding values real CTs store
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
                       WindowWidth=400)
    image = dicom.read(path)
    assert_close(image, expected_gray(stored, 1, -1024, center=40, width=400))
    assert image.min() == 0 and image.max() == 255
    water = dicom.read(write_dicom(tmp_path / "water.dcm", np.full((4, 4), 1064, np.int16), RescaleSlope=1,
                                   RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400))
    assert set(water.ravel()) <= {127, 128}  # 40 HU is the window centre: mid-grey


def test_voi_lut_sequence_wins_over_window(tmp_path):
    stored = ramp(0, 4095, np.uint16)
    table = np.rint(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # 12-bit output, descriptor 16
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 16], table.astype("<u2").tobytes()  # OW, as files store it
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item], WindowCenter=100, WindowWidth=50)
    assert_close(dicom.read(path), table[stored] / 4095 * 255)


def test_several_windows_first_is_used(tmp_path):
    stored = ramp(-1024, 2000, np.int16)
    path = write_dicom(tmp_path / "two.dcm", stored, WindowCenter=[40, 300], WindowWidth=[400, 1500])
    image = dicom.read(path)
    assert_close(image, expected_gray(stored, center=40, width=400))
    assert np.abs(image - expected_gray(stored, center=300, width=1500)).max() > 20


def test_8_bit_unsigned_without_window_is_min_max(tmp_path):
    stored = ramp(10, 200, np.uint8)
    image = dicom.read(write_dicom(tmp_path / "u8.dcm", stored))
    assert_close(image, expected_gray(stored))
    assert image.min() == 0 and image.max() == 255


def test_enhanced_multiframe_per_frame_windows(tmp_path):
    stored = np.stack([ramp(0, 1000, np.uint16)] * 3)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -100
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    frames = []
    for center in (100, 900, 1700):
        window, group = Dataset(), Dataset()
        window.WindowCenter, window.WindowWidth = center, 400
        group.FrameVOILUTSequence = [window]
        frames.append(group)
    path = write_dicom(tmp_path / "enhanced.dcm", stored, SharedFunctionalGroupsSequence=[shared],
                       PerFrameFunctionalGroupsSequence=frames)
    for frame, center in ((-1, 900), (0, 100), (2, 1700)):
        assert_close(dicom.read(path, frame=frame), expected_gray(stored[0], 2, -100, center=center, width=400))


def test_preamble_detection_without_suffix(tmp_path):
    stored = ramp(0, 1000, np.uint16)
    write_dicom(tmp_path / "IM000001", stored)
    write_dicom(tmp_path / "1.2.826.0.1.3680043.8.498.1", stored)  # named by its SOP Instance UID
    write_dicom(tmp_path / "IM000002", stored, preamble=False)  # no 'DICM': not recognisable without a name
    (tmp_path / "README").write_text("not an image " * 20)
    (tmp_path / "notes.txt").write_bytes(open(tmp_path / "IM000001", "rb").read())
    assert dicom.is_dicom(tmp_path / "IM000001") and dicom.is_dicom(open(tmp_path / "IM000001", "rb").read())
    assert [decode.is_image_file(tmp_path / name) for name in
            ("IM000001", "1.2.826.0.1.3680043.8.498.1", "IM000002", "README", "notes.txt")] == [
        True, True, False, False, False]
    assert_close(np.asarray(decode.open_image(tmp_path / "IM000001")), expected_gray(stored))
    shutil.copy(tmp_path / "IM000002", tmp_path / "old.dcm")  # with the name, a preamble-less file still reads
    assert_close(dicom.read(tmp_path / "old.dcm"), expected_gray(stored))


def test_image_header_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "header_only.dcm", ramp(0, 10, np.uint8))
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path)
    with pytest.raises(decode.UnreadableImage, match=r"no pixel data although the header describes an image "
                                                     r"\(SOP class CT Image Storage, Modality CT\)"):
        dicom.read(path)
    with pytest.raises(decode.UnreadableImage, match=r"frame 1 .* 1 frame\(s\)"):
        dicom.read(write_dicom(tmp_path / "one.dcm", ramp(0, 10, np.uint8)), frame=1)


# ------------------------------------------------------------------------------------- a DICOM imagefolder

def test_rsna_style_dicom_imagefolder(tmp_path):
    root = tmp_path / "rsna"
    # "normal": dark single frames; "pneumonia": 3 frames dark, bright, dark, so the frame read shows in the pixels.
    dark, bright = np.full((20, 24), 0, np.int16), np.full((20, 24), 1200, np.int16)
    window = {"WindowCenter": 600, "WindowWidth": 200}
    for split, count in (("train", 4), ("test", 2)):
        for index in range(count):
            write_dicom(root / split / "normal" / f"{split}{index}.dcm", dark + index, **window)
            write_dicom(root / split / "pneumonia" / f"IM{split}{index}", np.stack([dark, bright + index, dark]),
                        **window)  # no suffix: found by its preamble
    shutil.copy(sample("reportsi.dcm"), root / "train" / "normal" / "report.dcm")

    def load(**overrides):
        config = default_config()
        config.update(format="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), decode_threads=2,
                      cache_size=24, val_fraction=0.0, **overrides)
        return load_dataset(config, VIT)

    dataset = load()
    assert dataset.class_names == ["normal", "pneumonia"]
    assert [entry["id"] for entry in dataset.skipped] == [str(root / "train" / "normal" / "report.dcm")]
    assert "Basic Text SR Storage, Modality SR: not an image" in dataset.skipped[0]["error"]
    test = dataset.splits["test"]
    assert test.images.shape == (4, 16, 16, 3) and np.bincount(test.labels).tolist() == [2, 2]
    assert len(dataset.splits["train"].labels) == 8
    brightness = {label: test.images[test.labels == label].mean() for label in (0, 1)}
    assert brightness[0] == 0 and brightness[1] == 255  # middle frame of the pneumonia files: bright
    first_frames = load(dicom_frame=0).splits["test"]  # a different setting: a new cache, frame 0 is dark
    assert first_frames.images[first_frames.labels == 1].mean() == 0
