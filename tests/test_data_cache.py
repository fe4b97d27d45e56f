"""The decoded cache: reused across runs, rebuilt when files or settings change, never trusted half-written;
eval splits are the HF processor's geometry of the original files; duplicates across splits are reported."""

import io
import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from jaxmed.data import cache, default_config, load_dataset, synthetic
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

VIT = Preprocessor(processor_type="ViTImageProcessor", size={"height": 16, "width": 16})


def data_config(tmp_path, root, **overrides):
    config = default_config()
    config.update(format="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), decode_threads=2,
                  cache_size=40, val_fraction=0.0, grayscale=False)
    config.update(overrides)
    return config


def smooth_jpeg(path, seed, size=(48, 64), quality=90):
    """MRI-like smooth content: white noise would make every resampling difference look huge."""
    small = np.random.default_rng(seed).integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=quality)
    return path


def make_folder(root, per_class=4):
    for split, offset in (("train", 0), ("test", 100)):
        for label, name in enumerate(("glioma", "meningioma")):
            for index in range(per_class):
                smooth_jpeg(root / split / name / f"{index}.jpg", seed=offset + 10 * label + index,
                            size=(48 + 8 * index, 64 - 4 * index))
    return root


def test_cache_is_reused_and_rebuilt_when_a_file_or_setting_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    first = load_dataset(data_config(tmp_path, root), VIT).directory

    def no_build(*args):
        raise AssertionError("the cache should have been reused")
    with monkeypatch.context() as patch:
        patch.setattr(cache, "build", no_build)
        assert load_dataset(data_config(tmp_path, root), VIT).directory == first
    smooth_jpeg(root / "train" / "glioma" / "0.jpg", seed=555)  # same name, new content, size and mtime
    edited = load_dataset(data_config(tmp_path, root), VIT).directory
    gray = load_dataset(data_config(tmp_path, root, grayscale=True), VIT).directory
    larger = load_dataset(data_config(tmp_path, root), Preprocessor(processor_type="ViTImageProcessor",
                                                                    size={"height": 24, "width": 24})).directory
    assert len({first, edited, gray, larger}) == 4
    assert sorted(path.name for path in first.iterdir()) == ["leakage.json", "meta.json", "test.npy", "train.npy"]


def test_a_killed_build_leaves_nothing_that_is_reused(tmp_path):
    # The build process is SIGKILLed half-way through decoding (as an OOM kill or preemption would).
    root = make_folder(tmp_path / "data", per_class=6)
    script = textwrap.dedent(f"""
        import os, signal
        from jaxmed.data import decode, load_dataset, default_config
        from jaxmed.data.preprocess import Preprocessor
        calls, clean = [], decode.clean
        def dying(image, **kwargs):
            calls.append(1)
            if len(calls) == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            return clean(image, **kwargs)
        decode.clean = dying
        config = default_config()
        config.update(format="imagefolder", root={str(root)!r}, cache_dir={str(tmp_path / 'cache')!r},
                      decode_threads=1, cache_size=40, val_fraction=0.0, grayscale=False)
        load_dataset(config, Preprocessor(processor_type="ViTImageProcessor", size={{"height": 16, "width": 16}}))
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert process.returncode == -signal.SIGKILL
    leftovers = list((tmp_path / "cache").iterdir())
    assert leftovers and all(path.name.startswith(".") and ".tmp-" in path.name for path in leftovers)
    dataset = load_dataset(data_config(tmp_path, root), VIT)  # builds afresh, removing the dead build's folder
    assert len(dataset.splits["train"]) == 12 and (dataset.directory / "meta.json").exists()
    assert not [path for path in (tmp_path / "cache").iterdir() if ".tmp-" in path.name]


def test_an_interrupted_build_cleans_up(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cache, "_finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(data_config(tmp_path, root), VIT)
    assert list((tmp_path / "cache").iterdir()) == []


def test_eval_splits_are_the_hf_processor_geometry_of_the_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    root = make_folder(tmp_path / "data")
    settings = {"size": {"shortest_edge": 32}, "crop_pct": 0.875, "resample": 3,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    convnext = Preprocessor.from_config({"image_processor_type": "ConvNextImageProcessor", **settings})
    hf = transformers.ConvNextImageProcessor(**settings)
    dataset = load_dataset(data_config(tmp_path, root), convnext)
    test = dataset.splits["test"]
    assert test.images.shape == (8, 32, 32, 3) and test.model_ready
    for row, path in enumerate(test.ids):
        original = Image.open(path).convert("RGB")
        np.testing.assert_array_equal(test.images[row], convnext.geometry(original))  # bit-equal
        expected = hf(original, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(convnext.normalize(test.images[row]), expected, atol=1e-5)
    train = dataset.splits["train"]  # the whole image squashed to max(cache_size, 32), original size kept
    assert train.images.shape == (8, 40, 40, 3) and not train.model_ready
    sizes = {tuple(Image.open(path).size[::-1]) for path in train.ids}
    assert {tuple(size) for size in train.sizes} == sizes


def test_processor_with_varying_output_size_is_refused(tmp_path):
    shortest_edge_only = Preprocessor(processor_type="ViTImageProcessor", size={"shortest_edge": 32})
    with pytest.raises(JaxmedError, match="varying"):
        load_dataset(data_config(tmp_path, make_folder(tmp_path / "data")), shortest_edge_only)


def test_exact_and_near_duplicates_across_splits_are_reported_and_dropped(tmp_path):
    root = make_folder(tmp_path / "data", per_class=5)
    train_file = root / "train" / "glioma" / "1.jpg"
    (root / "test" / "glioma" / "copy.jpg").write_bytes(train_file.read_bytes())  # exact
    original = Image.open(root / "train" / "meningioma" / "2.jpg")
    buffer = io.BytesIO()
    ImageEnhance.Brightness(original).enhance(1.1).resize((40, 30)).save(buffer, format="JPEG", quality=60)
    (root / "test" / "meningioma" / "edited.jpg").write_bytes(buffer.getvalue())  # near: resized, re-encoded
    dataset = load_dataset(data_config(tmp_path, root, val_fraction=0.2), VIT)
    report = json.loads((dataset.directory / "leakage.json").read_text())
    assert report == dataset.leakage
    train_test = report["pairs"]["train-test"]
    assert (train_test["exact"], train_test["near"]) == (1, 1)
    assert train_test["exact_examples"] == [{"train": str(train_file), "test": str(root / "test/glioma/copy.jpg")}]
    assert train_test["near_examples"][0]["test"].endswith("edited.jpg")
    assert report["pairs"]["train-val"]["exact"] + report["pairs"]["train-val"]["near"] == 0
    assert report["dropped_from_train"] == 0

    dropped = load_dataset(data_config(tmp_path, root, val_fraction=0.2, drop_duplicates=True), VIT)
    assert dropped.leakage["dropped_from_train"] == 2
    kept = dataset.splits["train"].ids + dataset.splits["val"].ids
    remaining = dropped.splits["train"].ids + dropped.splits["val"].ids
    assert sorted(set(kept) - set(remaining)) == sorted([str(train_file), str(root / "train/meningioma/2.jpg")])


def test_look_alike_phantoms_are_not_near_duplicates(tmp_path):
    # Distinct brain slices share low frequencies; the thumbnail confirmation keeps them from being flagged.
    config = default_config()
    config.update(cache_dir=str(tmp_path / "cache"), decode_threads=2, cache_size=32)
    config.synthetic.update(size=64, train_per_class=60, test_per_class=30)
    dataset = load_dataset(config, VIT)
    assert all(found["exact"] == 0 and found["near"] == 0 for found in dataset.leakage["pairs"].values())
    assert len(synthetic.CLASS_NAMES) == len(dataset.class_names)
