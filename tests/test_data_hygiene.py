"""Input hygiene on a folder holding every kind of file users' downloads contain: odd but valid images (grayscale,
RGBA, palette, CMYK, 16-bit, EXIF-rotated) become 3-channel uint8; unreadable ones (corrupt, truncated, 0-byte,
wrong content, random bytes) are listed and skipped, or an error with strict; junk is ignored."""

import io

import numpy as np
import pytest
from PIL import Image

from jaxmed.data import default_config, load_dataset, train_iterator
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

VIT = Preprocessor(processor_type="ViTImageProcessor", size={"height": 16, "width": 16})
BAD = ["corrupt.png", "empty.jpg", "random.png", "text.jpg", "truncated.jpg"]


def data_config(tmp_path, root, **overrides):
    config = default_config()
    config.update(format="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), decode_threads=2,
                  cache_size=24, val_fraction=0.0)
    config.update(overrides)
    return config


def jpeg_bytes(seed, size=(20, 30), mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def colourful(seed, size=(20, 30)):
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[..., seed % 3] = 200
    return Image.fromarray(pixels)


def make_messy_folder(root):
    glioma = root / "train" / "glioma"
    glioma.mkdir(parents=True)
    for index in range(3):
        (glioma / f"good_{index}.jpg").write_bytes(jpeg_bytes(index))
    colourful(0).convert("L").save(glioma / "gray.png")
    colourful(1).convert("RGBA").save(glioma / "rgba.png")
    colourful(2).convert("P").save(glioma / "palette.png")
    Image.frombytes("CMYK", (30, 20), bytes(range(256)) * 9 + bytes(96)).save(glioma / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 4095, 600).reshape(20, 30).astype(np.uint16)).save(glioma / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    colourful(0, size=(20, 30)).save(glioma / "rotated.jpg", exif=exif)
    # Unreadable files, each a different way.
    png = io.BytesIO()
    colourful(1).save(png, format="PNG")
    corrupt = bytearray(png.getvalue())
    corrupt[60] ^= 0xFF  # inside the image data: the PNG checksum no longer matches
    (glioma / "corrupt.png").write_bytes(bytes(corrupt))
    (glioma / "truncated.jpg").write_bytes(jpeg_bytes(7)[:300])
    (glioma / "empty.jpg").write_bytes(b"")
    (glioma / "text.jpg").write_text("<html>403 Forbidden</html>")
    (glioma / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    # Junk that is never data, some of it with image names.
    (glioma / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (glioma / "._good_0.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (glioma / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (glioma / "notes.txt").write_text("scan notes")
    (glioma / ".ipynb_checkpoints").mkdir()
    (glioma / ".ipynb_checkpoints" / "good_0-checkpoint.jpg").write_bytes(jpeg_bytes(0))
    for split, count in (("train", 3), ("test", 2)):
        for name in ("glioma", "meningioma") if split == "test" else ("meningioma",):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                (folder / f"{name}_{index}.jpg").write_bytes(jpeg_bytes(100 + 10 * len(split) + index))
    return root


def test_bad_files_are_listed_and_skipped_and_odd_modes_become_rgb(tmp_path):
    root = make_messy_folder(tmp_path / "messy")
    dataset = load_dataset(data_config(tmp_path, root), VIT)
    assert sorted(entry["id"].rsplit("/", 1)[1] for entry in dataset.skipped) == BAD
    train = dataset.splits["train"]
    names = sorted(path.rsplit("/", 1)[1] for path, label in zip(train.ids, train.labels) if label == 0)
    assert names == ["cmyk.jpg", "deep.png", "good_0.jpg", "good_1.jpg", "good_2.jpg", "gray.png", "palette.png",
                     "rgba.png", "rotated.jpg"]  # no junk, no checkpoint copy
    assert train.images.shape == (12, 24, 24, 3) and train.images.dtype == np.uint8
    assert all(np.array_equal(image[..., 0], image[..., 2]) for image in train.images)  # grayscale=True
    by_name = {path.rsplit("/", 1)[1]: row for row, path in enumerate(train.ids)}
    assert train.sizes[by_name["rotated.jpg"]].tolist() == [30, 20]  # EXIF orientation applied: portrait
    deep = train.images[by_name["deep.png"]]
    assert deep.min() <= 5 and deep.max() >= 250  # 12-bit data in a 16-bit PNG stretched, not clipped
    batches = train_iterator(train, VIT, batch_size=4, seed=0, augment_settings=default_config().augment)
    for _ in range(6):  # two epochs: nothing left to fail mid-epoch
        assert next(batches)["image"].shape == (4, 16, 16, 3)


def test_colour_is_kept_without_grayscale(tmp_path):
    root = make_messy_folder(tmp_path / "messy")
    train = load_dataset(data_config(tmp_path, root, grayscale=False), VIT).splits["train"]
    row = [path.rsplit("/", 1)[1] for path in train.ids].index("rgba.png")
    red, green, blue = train.images[row].reshape(-1, 3).mean(axis=0)
    assert green > 150 and red < 30 and blue < 30


def test_strict_lists_every_unreadable_file(tmp_path):
    root = make_messy_folder(tmp_path / "messy")
    with pytest.raises(JaxmedError, match="5 unreadable images") as error:
        load_dataset(data_config(tmp_path, root, strict=True), VIT)
    assert all(name in str(error.value) for name in BAD)
    load_dataset(data_config(tmp_path, root), VIT)  # a cache built while skipping is not trusted by strict
    with pytest.raises(JaxmedError, match="unreadable"):
        load_dataset(data_config(tmp_path, root, strict=True), VIT)


def test_empty_class_unknown_test_class_and_unreadable_class_are_errors(tmp_path):
    root = make_messy_folder(tmp_path / "messy")
    (root / "train" / "pituitary").mkdir()
    (root / "train" / "pituitary" / "Thumbs.db").write_bytes(b"junk")
    with pytest.raises(JaxmedError, match="no images under .*pituitary"):
        load_dataset(data_config(tmp_path, root), VIT)
    (root / "train" / "pituitary" / "scan.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(JaxmedError, match="'pituitary' of .*train has no readable images"):
        load_dataset(data_config(tmp_path, root), VIT)
    (root / "train" / "pituitary" / "scan.jpg").write_bytes(jpeg_bytes(5))
    (root / "test" / "lymphoma").mkdir()
    (root / "test" / "lymphoma" / "a.jpg").write_bytes(jpeg_bytes(6))
    with pytest.raises(JaxmedError, match="classes \\['lymphoma'\\] that .*train does not have"):
        load_dataset(data_config(tmp_path, root), VIT)
