"""NIfTI volumes as data: nibabel's own volumes and volumes written here (orientations, 4-D, integer and float,
anisotropic voxels, corrupt files), through imagefolder (slices, patient groups, skipped files) and predict."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxmed.data import nifti
from jaxmed.errors import JaxmedError, UnreadableImage

nibabel = pytest.importorskip("nibabel")
from nibabel.testing import data_path  # noqa: E402

ANATOMICAL = os.path.join(data_path, "anatomical.nii")  # (33, 41, 25) big-endian int16, LAS, 2 mm voxels
EXAMPLE_4D = os.path.join(data_path, "example4d.nii.gz")  # (128, 96, 24, 2) int16, LAS, 2 × 2 × 2.2 mm


def _phantom(shape=(24, 20, 16), seed=0) -> np.ndarray:
    """An asymmetric bright blob in zeros, so every flip or transpose of the axes shows."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = np.exp(-(((x - shape[0] * 0.3) / 5) ** 2 + ((y - shape[1] * 0.6) / 4) ** 2 + ((z - shape[2] * 0.5) / 3) ** 2))
    return (1000 * blob + rng.uniform(0, 20, shape) * (blob > 0.05)).astype(np.float32)


def _save(array, path, zooms=(1.0, 1.0, 1.0), dtype=None) -> Path:
    image = nibabel.Nifti1Image(array if dtype is None else array.astype(dtype), np.diag([*zooms, 1.0]))
    nibabel.save(image, str(path))
    return Path(path)


def _volumes(**settings) -> nifti.Volumes:
    return nifti.Volumes(nifti.VolumeSettings(**settings))


def test_nibabel_shipped_volumes_canonical_and_windowed():
    volume, spacing = nifti.load(ANATOMICAL)
    original = nibabel.load(ANATOMICAL)
    canonical = np.asarray(nibabel.as_closest_canonical(original).dataobj, np.float64)
    assert nibabel.aff2axcodes(original.affine) == ("L", "A", "S") and volume.shape == (33, 41, 25)
    assert np.allclose(spacing, 2.0)
    low, high = np.percentile(canonical, [0.5, 99.5])
    expected = np.clip(np.rint((canonical - low) * 255 / (high - low)), 0, 255)
    assert np.array_equal(volume, expected.astype(np.uint8))  # RAS+ (x flipped from LAS), 0.5–99.5 % window
    assert _volumes().slice_indices(ANATOMICAL) == [12]
    middle = _volumes().read(nifti.VolumeSlice(ANATOMICAL, "axial", 12))
    assert middle.shape == (41, 33) and middle.dtype == np.uint8  # anterior at the top, x across
    assert np.array_equal(middle, np.rot90(volume[:, :, 12]))
    assert len(_volumes(axis="sagittal", slices="all").slice_indices(ANATOMICAL)) == 33

    four_d = nibabel.load(EXAMPLE_4D)
    for frame in (0, 1):
        volume, spacing = nifti.load(EXAMPLE_4D, frame)
        assert volume.shape == (128, 96, 24) and np.allclose(spacing, [2.0, 2.0, 2.2], atol=1e-4)
        raw = np.asarray(nibabel.as_closest_canonical(four_d.slicer[..., frame]).dataobj, np.float64)
        assert np.corrcoef(volume.ravel(), raw.ravel())[0, 1] > 0.99
    assert not np.array_equal(nifti.load(EXAMPLE_4D, 0)[0], nifti.load(EXAMPLE_4D, 1)[0])
    # 2.2 mm between axial slices: a coronal slice (z rows, x columns) gets 10% more rows, pixels square
    coronal = _volumes(axis="coronal").read(nifti.VolumeSlice(EXAMPLE_4D, "coronal", 48))
    assert coronal.shape == (round(24 * 2.2 / 2.0), 128)
    with pytest.raises(UnreadableImage, match="frame 2 asked for .data.volume_frame. but the volume has 2 frames"):
        nifti.load(EXAMPLE_4D, 2)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "S", "L"), ("I", "L", "A"), ("R", "A", "S")])
def test_any_stored_orientation_gives_the_same_slices(tmp_path, codes):
    data = _phantom()
    canonical = nibabel.Nifti1Image(data, np.diag([1.0, 1.5, 2.0, 1.0]))
    ornt = nibabel.orientations.ornt_transform(nibabel.orientations.axcodes2ornt(("R", "A", "S")),
                                               nibabel.orientations.axcodes2ornt(codes))
    stored = canonical.as_reoriented(ornt)  # what a scanner that stores (codes) order writes
    assert nibabel.aff2axcodes(stored.affine) == codes
    path = tmp_path / "volume.nii.gz"
    nibabel.save(stored, str(path))
    reference = tmp_path / "reference.nii.gz"
    nibabel.save(canonical, str(reference))
    for axis in nifti.AXES:
        volumes = _volumes(axis=axis, slices="all")
        ours, theirs = volumes.expand([path]), volumes.expand([reference])
        assert [entry.index for entry in ours] == [entry.index for entry in theirs]
        for mine, other in zip(ours, theirs):
            assert np.array_equal(volumes.read(mine), volumes.read(other)), (codes, axis, mine.index)


def test_integer_float_types_anisotropy_and_k_slices_of_the_nonempty_extent(tmp_path):
    data = np.zeros((20, 10, 40), np.float32)
    data[4:16, 2:8, 10:30] = 200 + _phantom((12, 6, 20))  # content only in axial slices 10..29
    as_float = _save(data, tmp_path / "float.nii", zooms=(1.0, 2.0, 3.0))
    as_int = _save(np.rint(data), tmp_path / "int16.nii.gz", zooms=(1.0, 2.0, 3.0), dtype=np.int16)
    volumes = _volumes(slices=4)
    # centres of 4 equal parts of the 20 occupied slices: 10 + 2.5, 7.5, 12.5, 17.5
    assert volumes.slice_indices(as_float) == volumes.slice_indices(as_int) == [12, 17, 22, 27]
    assert _volumes(slices=1).slice_indices(as_float) == [20]
    assert _volumes(slices=100).slice_indices(as_float) == list(range(10, 30))
    for path in (as_float, as_int):
        axial = volumes.read(nifti.VolumeSlice(str(path), "axial", 17))
        assert axial.shape == (20, 20)  # 10 rows of 2 mm → 20 of 1 mm; 20 columns of 1 mm
    a, b = (volumes.read(nifti.VolumeSlice(str(path), "axial", 17)).astype(int) for path in (as_float, as_int))
    assert np.abs(a - b).max() <= 1  # the same picture from int16 storage
    sagittal = _volumes(axis="sagittal").read(nifti.VolumeSlice(str(as_float), "sagittal", 10))
    assert sagittal.shape == (40 * 3 // 2, 10)  # z rows (3 mm) to y's 2 mm pixels: square pixels


def test_settings_are_checked_with_the_key_named():
    for key, value, message in [("volume_axis", "transverse", "data.volume_axis='transverse' is not one of"),
                                ("volume_slices", "some", "data.volume_slices='some' must be"),
                                ("volume_slices", 0, "data.volume_slices=0 must be"),
                                ("volume_slices", True, "data.volume_slices=True must be"),
                                ("volume_frame", -1, "data.volume_frame=-1 must be")]:
        with pytest.raises(JaxmedError, match=message.replace("(", r"\(")):
            nifti.VolumeSettings.from_config({key: value})
    assert nifti.VolumeSettings.from_config({"volume_slices": 3}).slices == 3


def _write_volume_folder(root: Path) -> dict:
    """train/{a,b}: 5 volumes each (8 axial slices) + a corrupt and an empty one in a; test/{a,b}: 1 volume each.
    Class b's blob is larger. Returns the counts the source must account for."""
    for split, count in (("train", 5), ("test", 1)):
        for label, size in (("a", 3), ("b", 6)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                data = _phantom((16, 16, 8), seed=index)
                data[..., :] *= np.linspace(0.5, 1.5, 8)  # slices differ
                data[16 // 2 - size:16 // 2 + size, 4:12, :] += 300
                name = f"{split}_{label}{index}.nii" + (".gz" if index % 2 else "")
                _save(data.astype(np.int16 if index % 2 else np.float32), folder / name, zooms=(1.0, 1.0, 2.0))
    (root / "train/a/broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "train/a/empty.nii").write_bytes(b"")
    return {"slices": {"train": 10 * 8, "test": 2 * 8}, "unreadable": 2}


def test_imagefolder_of_volumes_keeps_each_volume_in_one_split_and_counts_every_slice(tmp_path):
    import tiny_config
    from jaxmed import data as jdata
    from jaxmed.data.preprocess import Preprocessor
    from jaxmed.convert import TABLES

    counts = _write_volume_folder(tmp_path / "data")
    config = tiny_config.get_config().data
    config.format, config.root, config.cache_dir = "imagefolder", str(tmp_path / "data"), str(tmp_path / "cache")
    config.volume_slices = "all"
    preprocessor = Preprocessor.from_config({**TABLES["vit"][1], "size": {"height": 32, "width": 32}})
    dataset = jdata.load_dataset(config, preprocessor)
    ids = {name: split.ids for name, split in dataset.splits.items()}
    assert len(ids["train"]) + len(ids["val"]) == counts["slices"]["train"] and len(ids["test"]) == 16
    skipped = {Path(entry["id"]).name: entry["error"] for entry in dataset.skipped}
    assert set(skipped) == {"broken.nii.gz", "empty.nii"}  # listed with the reason, not dropped silently
    assert "not a readable NIfTI volume" in skipped["broken.nii.gz"] and "empty file" in skipped["empty.nii"]
    assert all("#axial=" in image_id for split in ids.values() for image_id in split)
    volumes_of = {name: {image_id.split("#")[0] for image_id in split} for name, split in ids.items()}
    assert not volumes_of["train"] & volumes_of["val"]  # the carved validation split takes whole volumes
    assert all(len([i for i in ids["val"] if i.startswith(volume + "#")]) == 8 for volume in volumes_of["val"])
    rows = list(csv.DictReader(dataset.splits_csv().splitlines()))
    assert {row["group"] for row in rows if row["split"] == "val"} == {
        os.path.relpath(volume, tmp_path / "data/train") for volume in volumes_of["val"]}

    # data.group_pattern decides instead: volume k of class a and volume k of class b are one "patient" here
    config.group_pattern = r"train_\w(\d)"
    grouped = jdata.load_dataset(config, preprocessor)
    patients = {name: {Path(image_id).name.split("#")[0][7] for image_id in split.ids}
                for name, split in grouped.splits.items() if name != "test"}
    assert len(patients["val"]) == 1 and not patients["train"] & patients["val"]
    assert len(grouped.splits["val"]) == 2 * 8  # both volumes of that patient, all their slices


def test_predict_reads_volumes_as_the_dataset_does(tmp_path, capsys):
    """A folder of volumes through `jaxmed.predict --model`: a row per slice named path#axis=index, the corrupt
    volumes in skipped.csv, every slice's model input equal to the dataset cache's for the same slice."""
    import tiny_config
    from transformers import ViTConfig, ViTForImageClassification

    from jaxmed import data as jdata, predict
    from jaxmed.data.preprocess import Preprocessor
    from jaxmed.convert import TABLES
    from jaxmed.export import INPUT_FILE

    _write_volume_folder(tmp_path / "data")
    model_dir = tmp_path / "model"
    hf = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=2,
                                             id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1}))
    hf.save_pretrained(model_dir)
    processor = {**TABLES["vit"][1], "size": {"height": 32, "width": 32}}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    (model_dir / INPUT_FILE).write_text(json.dumps({"grayscale": True, "dicom_frame": -1, "volume_axis": "axial",
                                                    "volume_slices": 3, "volume_frame": 0}))
    out = tmp_path / "out"
    assert predict.main(["--model", str(model_dir), str(tmp_path / "data"), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 * 3 and all("#axial=" in row["path"] for row in rows)
    skipped = {Path(row["path"]).name: row["reason"] for row in csv.DictReader((out / "skipped.csv").open())}
    assert set(skipped) == {"broken.nii.gz", "empty.nii"} and "not a readable NIfTI volume" in skipped["broken.nii.gz"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["volumes"] == {"files": 14, "slices": 36, "volume_axis": "axial", "volume_slices": 3,
                                  "volume_frame": 0}
    assert (summary["predicted"], summary["skipped"]) == (36, 2)

    # the model input of every slice is the dataset cache's evaluation image of the same slice id
    config = tiny_config.get_config().data
    config.format, config.root, config.cache_dir = "imagefolder", str(tmp_path / "data"), str(tmp_path / "cache")
    config.volume_slices = 3
    test = jdata.load_dataset(config, Preprocessor.from_config(processor)).splits["test"]
    predictor = predict.load_predictor(model_dir=model_dir)
    decode_one = predict._decoder(predictor)
    entries = nifti.Volumes(predictor.volumes).expand(sorted((tmp_path / "data/test").rglob("*.nii*")))
    assert sorted(str(entry) for entry in entries) == sorted(test.ids) and len(entries) == 6
    assert {str(entry) for entry in entries} <= {row["path"] for row in rows}
    for entry in entries:
        image, reason = decode_one(entry)
        assert reason is None and np.array_equal(image, test.images[test.ids.index(str(entry))])
