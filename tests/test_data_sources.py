"""Every `data.format` on a small generated dataset: imagefolder in the three real Kaggle layouts, Hugging Face
(save_to_disk, parquet, split folders), MedMNIST npz, TFDS array_record, and the synthetic phantoms."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from jaxmed.data import default_config, load_dataset, synthetic
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

VIT = Preprocessor(processor_type="ViTImageProcessor", size={"height": 16, "width": 16})


def data_config(tmp_path, **overrides):
    config = default_config()
    config.cache_dir = str(tmp_path / "cache")
    config.decode_threads = 2
    config.cache_size = 24
    config.update(overrides)
    return config


def write_images(folder, count, seed, size=(20, 28), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"img_{seed}_{index}.jpg", quality=90)


def counts(dataset):
    return {name: np.bincount(split.labels, minlength=len(dataset.class_names)).tolist()
            for name, split in dataset.splits.items()}


def test_imagefolder_brisc_layout(tmp_path):
    root = tmp_path / "brisc2025"
    for split, per_class in (("train", 5), ("test", 2)):
        for index, name in enumerate(["pituitary", "glioma", "no_tumor", "meningioma"]):
            write_images(root / "classification_task" / split / name, per_class + (index == 0),
                         seed=index + 10 * per_class)
    dataset = load_dataset(data_config(tmp_path, format="imagefolder", root=str(root), val_fraction=0.2), VIT)
    assert dataset.class_names == ["glioma", "meningioma", "no_tumor", "pituitary"]  # sorted folder names
    assert counts(dataset) == {"train": [4, 4, 4, 4], "val": [1, 1, 1, 2], "test": [2, 2, 2, 3]}
    test = dataset.splits["test"]
    assert test.images.shape == (9, 16, 16, 3) and test.images.dtype == np.uint8
    assert all(path.startswith(str(root / "classification_task" / "test")) for path in test.ids)
    assert dataset.splits["train"].images.shape[1:] == (24, 24, 3)


def test_imagefolder_kermany_layout_nested_with_macosx_and_merge(tmp_path):
    root = tmp_path / "archive"
    for split, sizes in (("train", (6, 9)), ("val", (2, 2)), ("test", (3, 4))):
        for name, count in zip(["NORMAL", "PNEUMONIA"], sizes):
            write_images(root / "chest_xray" / split / name, count, seed=count, mode="L")
            write_images(root / "__MACOSX" / "chest_xray" / split / name, 1, seed=99)  # junk copy, never read
    kept = load_dataset(data_config(tmp_path, format="imagefolder", root=str(root)), VIT)
    assert kept.class_names == ["NORMAL", "PNEUMONIA"]
    assert counts(kept) == {"train": [6, 9], "val": [2, 2], "test": [3, 4]}  # the given val is used as is
    merged = load_dataset(data_config(tmp_path, format="imagefolder", root=str(root), merge_train_val=True,
                                      val_fraction=0.2), VIT)
    assert counts(merged) == {"train": [6, 9], "val": [2, 2], "test": [3, 4]}
    assert sorted(merged.splits["train"].ids + merged.splits["val"].ids) == sorted(
        kept.splits["train"].ids + kept.splits["val"].ids)  # re-split from the 19 merged images
    assert merged.splits["val"].ids != kept.splits["val"].ids
    assert not any("__MACOSX" in path for split in merged.splits.values() for path in split.ids)


def test_imagefolder_nickparvar_layout(tmp_path):
    for split in ("Training", "Testing"):
        for index, name in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
            write_images(tmp_path / "data" / split / name, 3, seed=index + 10 * len(split))
    dataset = load_dataset(data_config(tmp_path, format="imagefolder", root=str(tmp_path / "data"),
                                       val_fraction=0.0), VIT)
    assert dataset.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert set(dataset.splits) == {"train", "test"}
    assert counts(dataset) == {"train": [3, 3, 3, 3], "test": [3, 3, 3, 3]}


def _hf_dataset_dict(rng):
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"])})

    def split(count):
        images = [Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)) for _ in range(count)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 4 for i in range(count)]}, features)
    return datasets.DatasetDict({"Training": split(16), "Testing": split(8)})


def test_hf_save_to_disk_and_parquet(tmp_path):
    dataset_dict = _hf_dataset_dict(np.random.default_rng(0))
    dataset_dict.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    for name, split in dataset_dict.items():
        split.to_parquet(str(tmp_path / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    for root in ("disk", "parquet"):
        dataset = load_dataset(data_config(tmp_path, format="hf", root=str(tmp_path / root), val_fraction=0.25), VIT)
        assert dataset.class_names == ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
        assert counts(dataset) == {"train": [3, 3, 3, 3], "val": [1, 1, 1, 1], "test": [2, 2, 2, 2]}
        first = dataset.splits["test"].ids.index("hf:test/0")
        expected = VIT.geometry(Image.fromarray(np.asarray(dataset_dict["Testing"][0]["image"])).convert("L"))
        np.testing.assert_array_equal(dataset.splits["test"].images[first], expected)


def test_hf_split_folders_keep_train_and_test_apart(tmp_path):
    # datasets' own imagefolder inference would merge Training/ and Testing/ into one "train" split.
    for split, count in (("Training", 4), ("Testing", 2)):
        for name in ("glioma_tumor", "no_tumor"):
            write_images(tmp_path / "sartaj" / split / name, count, seed=count)
    dataset = load_dataset(data_config(tmp_path, format="hf", root=str(tmp_path / "sartaj"), val_fraction=0.0),
                           VIT)
    assert dataset.class_names == ["glioma_tumor", "no_tumor"]
    assert counts(dataset) == {"train": [4, 4], "test": [2, 2]}


def test_npz_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 30), ("val", 6), ("test", 9)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 3).reshape(-1, 1)
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    config = data_config(tmp_path, format="npz", root=str(tmp_path / "dermamnist.npz"), class_names=("a", "b", "c"))
    dataset = load_dataset(config, VIT)
    assert dataset.class_names == ["a", "b", "c"]
    assert counts(dataset) == {"train": [10, 10, 10], "val": [2, 2, 2], "test": [3, 3, 3]}
    assert dataset.splits["test"].ids == [f"npz:test/{index}" for index in range(9)]
    image = dataset.splits["test"].images[4]
    np.testing.assert_array_equal(image, VIT.geometry(Image.fromarray(arrays["test_images"][4]).convert("RGB")))

    arrays["train_labels"] = np.zeros((30, 14), np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    with pytest.raises(JaxmedError, match="multi-label"):
        load_dataset(data_config(tmp_path, format="npz", root=str(tmp_path / "chestmnist.npz")), VIT)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="preparing a TFDS dataset needs "
                    "tensorflow (pip install 'jaxmed[tfds]'); reading it does not")
def test_tfds_array_record(tmp_path):
    # Prepared in a subprocess: TensorFlow (needed to encode images) stays out of the test process, and reading
    # below shows that tfds.data_source needs no TensorFlow.
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow_datasets as tfds
        features = tfds.features.FeaturesDict({{"image": tfds.features.Image(shape=(None, None, 3)),
                                               "label": tfds.features.ClassLabel(names=["benign", "malignant"])}})
        rng = np.random.default_rng(0)
        def examples(count):
            return [(index, {{"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "label": index % 2}})
                    for index in range(count)]
        tfds.dataset_builders.store_as_tfds_dataset(
            name="toy_lesions", version="1.0.0", features=features, data_dir={str(tmp_path / "tfds")!r},
            split_datasets={{"train": examples(10), "test": examples(4)}}, file_format="array_record")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    dataset = load_dataset(data_config(tmp_path, format="tfds", root=str(tmp_path / "tfds"), val_fraction=0.2), VIT)
    assert "tensorflow" not in sys.modules
    assert dataset.class_names == ["benign", "malignant"]
    assert counts(dataset) == {"train": [4, 4], "val": [1, 1], "test": [2, 2]}
    assert dataset.splits["test"].images.shape == (4, 16, 16, 3)


def test_synthetic_phantoms_are_deterministic_and_varied():
    images, labels, planes = synthetic.generate("train", 12, 48, seed=3)
    again, _, _ = synthetic.generate("train", 12, 48, seed=3)
    other, _, _ = synthetic.generate("train", 12, 48, seed=4)
    test, _, _ = synthetic.generate("test", 12, 48, seed=3)
    assert images.shape == (48, 48, 48) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, other) and not np.array_equal(images, test)
    assert np.bincount(labels).tolist() == [12] * 4 and set(planes.tolist()) == {0, 1, 2}
    assert len({image.tobytes() for image in images}) == len(images)


def test_synthetic_source_and_count_table(tmp_path, caplog):
    config = data_config(tmp_path)
    config.synthetic.update(size=32, train_per_class=10, test_per_class=3, seed=1)
    with caplog.at_level("INFO", logger="jaxmed.data"):
        dataset = load_dataset(config, VIT)
    assert dataset.class_names == synthetic.CLASS_NAMES
    assert counts(dataset) == {"train": [8] * 4, "val": [2] * 4, "test": [3] * 4}
    assert "glioma  meningioma  no_tumor  pituitary  total" in caplog.text
    assert "train       8           8         8          8     32" in caplog.text
    assert json.loads((dataset.directory / "meta.json").read_text())["class_names"] == synthetic.CLASS_NAMES


def test_unknown_format_and_missing_root_explain_what_to_do(tmp_path):
    with pytest.raises(JaxmedError, match="not one of"):
        load_dataset(data_config(tmp_path, format="csv"), VIT)
    with pytest.raises(JaxmedError, match="--config.data.root=PATH"):
        load_dataset(data_config(tmp_path, format="imagefolder"), VIT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaxmedError, match="no images under .*empty.*configs/demo.py"):
        load_dataset(data_config(tmp_path, format="imagefolder", root=str(tmp_path / "empty")), VIT)
