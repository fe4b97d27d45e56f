"""Splits equal scikit-learn's; augmentation is one correct affine warp, deterministic by seed and within its
bounds; iterators resume exactly and shard exactly across hosts; eval covers every example once."""

import math

import jax
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from jaxmed.data import (AugmentSettings, Split, augment, class_weights, default_config, eval_batches, load_dataset,
                         model_inputs, pipeline, steps_per_epoch, train_iterator)
from jaxmed.data.preprocess import Preprocessor
from jaxmed.data.splits import carve_validation

VIT = Preprocessor(processor_type="ViTImageProcessor", size={"height": 16, "width": 16})
AUGMENT = AugmentSettings(translate=0.1)


def smooth_image(seed, height=64, width=64):
    small = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def memory_split(count, labels=None, side=24, name="train", model_ready=False):
    images = np.stack([smooth_image(seed, side, side) for seed in range(count)])
    labels = np.arange(count) % 3 if labels is None else np.asarray(labels)
    sizes = np.tile([[48, 36]], (count, 1)).astype(np.int32)  # originals were portrait 48×36
    return Split(name, images, labels.astype(np.int32), [f"image {index}" for index in range(count)], sizes,
                 model_ready, path="")


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------------------------------------ splits

def test_validation_split_is_scikit_learns(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    np.savez(tmp_path / "data.npz", train_images=rng.integers(0, 256, (50, 8, 8), dtype=np.uint8),
             train_labels=labels[:, None], test_images=np.zeros((3, 8, 8), np.uint8), test_labels=np.zeros((3, 1)))
    config = default_config()
    config.update(format="npz", root=str(tmp_path / "data.npz"), cache_dir=str(tmp_path / "cache"),
                  cache_size=16, val_fraction=0.3)
    dataset = load_dataset(config, VIT)
    train, val = train_test_split(np.arange(50), test_size=0.3, stratify=labels, random_state=42)
    assert dataset.splits["train"].ids == [f"npz:train/{index}" for index in train]  # sklearn's order, too
    assert dataset.splits["val"].ids == [f"npz:train/{index}" for index in val]
    np.testing.assert_array_equal(dataset.splits["val"].labels, labels[val])
    for fraction, seed in ((0.2, 42), (0.25, 7)):
        ours = carve_validation(labels, fraction, seed)
        theirs = train_test_split(np.arange(50), test_size=fraction, stratify=labels, random_state=seed)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ augmentation

def test_augmentation_parameters_stay_within_bounds_and_follow_the_seed():
    settings = AugmentSettings(translate=0.1)
    draws = [augment.sample(np.random.default_rng(seed), 48, 36, settings) for seed in range(2000)]
    again = [augment.sample(np.random.default_rng(seed), 48, 36, settings) for seed in range(2000)]
    assert draws == again
    assert len({params.angle for params in draws}) == len(draws)
    for params in draws:
        x, y, width, height = params.crop
        assert -15 <= params.angle <= 15
        assert 0 <= x and x + width <= 36 and 0 <= y and y + height <= 48
        assert 0.8 * 0.97 <= width * height / (48 * 36) <= 1.0  # integer rounding of the crop sides
        assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1
        assert abs(params.shift[0]) <= round(3.6) and abs(params.shift[1]) <= round(4.8)  # whole pixels
        assert 0.8 <= params.brightness <= 1.2 and 0.8 <= params.contrast <= 1.2
    assert 0.4 < np.mean([params.hflip for params in draws]) < 0.6
    assert 0.4 < np.mean([params.vflip for params in draws]) < 0.6
    angles = np.array([params.angle for params in draws])
    assert angles.min() < -14 and angles.max() > 14


def test_fused_warp_is_exact_for_flips_rotations_and_crops():
    image = smooth_image(0, 32, 32)
    full = augment.Params(crop=(0, 0, 32, 32))
    np.testing.assert_array_equal(augment.apply(image, full, (32, 32), (32, 32)), image)
    np.testing.assert_array_equal(augment.apply(image, augment.Params(crop=(0, 0, 32, 32), hflip=True),
                                                (32, 32), (32, 32)), image[:, ::-1])
    np.testing.assert_array_equal(augment.apply(image, augment.Params(crop=(0, 0, 32, 32), vflip=True),
                                                (32, 32), (32, 32)), image[::-1])
    np.testing.assert_array_equal(augment.apply(image, augment.Params(crop=(0, 0, 32, 32), angle=90),
                                                (32, 32), (32, 32)), np.rot90(image))  # counter-clockwise
    np.testing.assert_array_equal(augment.apply(image, augment.Params(crop=(8, 4, 16, 20)), (32, 32), (20, 16)),
                                  image[4:24, 8:24])
    # A 64×32 original cached squashed to 32×32: a crop in original pixels lands on the right cached pixels.
    np.testing.assert_array_equal(augment.apply(image, augment.Params(crop=(0, 32, 32, 32)), (64, 32), (16, 32)),
                                  image[16:32])


def test_fused_warp_matches_the_sequential_pil_chain():
    """torchvision's PIL path — rotate, crop, flip, brightness, contrast — one op at a time."""
    original = smooth_image(3, 64, 64)[..., :1].repeat(3, axis=2)  # gray, as data.grayscale makes MRI
    for contrast_first in (False, True):
        params = augment.Params(crop=(10.0, 6.0, 40.0, 48.0), angle=12.0, hflip=True, brightness=1.15,
                                contrast=0.85, contrast_first=contrast_first)
        ours = augment.apply(original, params, (64, 64), (48, 40))
        pil = Image.fromarray(original).rotate(12.0, resample=Image.Resampling.BILINEAR)
        pil = pil.crop((10, 6, 50, 54)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        brightness, contrast = ImageEnhance.Brightness, ImageEnhance.Contrast
        pil = (brightness(contrast(pil).enhance(0.85)).enhance(1.15) if contrast_first
               else contrast(brightness(pil).enhance(1.15)).enhance(0.85))
        difference = np.abs(ours.astype(int) - np.asarray(pil).astype(int))
        inside = np.s_[4:-4, 4:-4]  # the rotated corners differ by where each library puts the zero border
        assert difference[inside].mean() < 1.0 and np.percentile(difference[inside], 99) <= 3
    # Intensity alone is PIL's, to the bit.
    adjusted = augment.adjust_intensity(original, 1.15, 0.85)
    np.testing.assert_array_equal(adjusted, np.asarray(ImageEnhance.Contrast(
        ImageEnhance.Brightness(Image.fromarray(original)).enhance(1.15)).enhance(0.85)))


def test_train_cache_eval_view_is_close_to_the_processor_on_the_original():
    convnext = Preprocessor.from_config({"image_processor_type": "ConvNextImageProcessor",
                                         "size": {"shortest_edge": 32}, "crop_pct": 0.875})
    original = smooth_image(5, 96, 72)
    cached = np.asarray(Image.fromarray(original).resize((40, 40), Image.Resampling.BILINEAR))
    view = pipeline.eval_view(cached, (96, 72), convnext, (32, 32), model_ready=False)
    difference = np.abs(view.astype(int) - convnext.geometry(original).astype(int))
    assert view.shape == (32, 32, 3) and difference.mean() < 3


# ------------------------------------------------------------------------------------------------ iterators

def test_training_batches_are_deterministic_and_uint8():
    split = memory_split(30)
    first = take(train_iterator(split, VIT, batch_size=8, seed=1, augment_settings=AUGMENT), 4)
    second = take(train_iterator(split, VIT, batch_size=8, seed=1, augment_settings=AUGMENT), 4)
    other = take(train_iterator(split, VIT, batch_size=8, seed=2, augment_settings=AUGMENT), 4)
    assert_same_batches(first, second)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    batch = first[0]
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
    np.testing.assert_array_equal(batch["label"], split.labels[batch["index"]])
    config_off = default_config().augment
    config_off.enabled = False
    plain = next(train_iterator(split, VIT, batch_size=8, seed=1, augment_settings=config_off))
    row = plain["index"][0]
    expected = pipeline.eval_view(split.images[row], split.sizes[row], VIT, (16, 16), model_ready=False)
    np.testing.assert_array_equal(plain["image"][0], expected)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_resumes_with_exactly_the_following_batches(num_workers):
    split = memory_split(30)

    def fresh():
        return train_iterator(split, VIT, batch_size=6, seed=3, augment_settings=AUGMENT, num_workers=num_workers)
    iterator = fresh()
    take(iterator, 7)  # past the first epoch (5 batches)
    state = iterator.get_state()
    expected = take(iterator, 4)
    resumed = fresh()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected)


def test_two_hosts_cover_each_epoch_exactly_once():
    split = memory_split(40)
    epochs = {0: [], 1: []}
    for process_index in (0, 1):
        iterator = train_iterator(split, VIT, batch_size=8, seed=5, augment_settings=AUGMENT,
                                  process_index=process_index, process_count=2)
        batches = take(iterator, 10)  # 20 examples per host per epoch, 4 per host batch: 5 batches per epoch
        assert all(batch["image"].shape[0] == 4 for batch in batches)
        for epoch in (0, 1):
            epochs[epoch].append(np.concatenate([batch["index"] for batch in batches[5 * epoch:5 * epoch + 5]]))
    for epoch, (host0, host1) in epochs.items():
        assert sorted(np.concatenate([host0, host1]).tolist()) == list(range(40))
        assert set(host0.tolist()) == set(range(0, 40, 2))  # sharded before shuffling
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # reshuffled each epoch
    assert steps_per_epoch(split, 8) == 5


def test_eval_batches_cover_every_example_once_over_two_hosts():
    split = memory_split(13, name="test", side=16, model_ready=True)
    seen = []
    lengths = set()
    for process_index in (0, 1):
        batches = list(eval_batches(split, VIT, batch_size=4, process_index=process_index, process_count=2))
        lengths.add(len(batches))
        for batch in batches:
            assert batch["image"].shape == (2, 16, 16, 3) and batch["mask"].dtype == bool
            seen += batch["index"][batch["mask"]].tolist()
            np.testing.assert_array_equal(batch["image"][batch["mask"]], split.images[batch["index"][batch["mask"]]])
            assert not batch["image"][~batch["mask"]].any()
    assert lengths == {math.ceil(math.ceil(13 / 2) / 2)}  # same number of steps on both hosts
    assert sorted(seen) == list(range(13))


def test_balanced_sampling_and_class_weights():
    labels = np.array([0] * 40 + [1] * 8 + [2] * 2)
    split = memory_split(50, labels=labels)
    batches = take(train_iterator(split, VIT, batch_size=10, seed=0, balanced=True), 60)
    drawn = np.concatenate([batch["label"] for batch in batches])
    assert np.all(np.abs(np.bincount(drawn, minlength=3) / len(drawn) - 1 / 3) < 0.05)
    again = take(train_iterator(split, VIT, batch_size=10, seed=0, balanced=True), 60)
    assert_same_batches(batches, again)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(class_weights(labels, 3), expected, rtol=1e-6)
    assert class_weights(np.array([0, 0, 2]), 3)[1] == 0


def test_model_inputs_normalise_inside_jit():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    normalised = jax.jit(lambda pixels: model_inputs(pixels, VIT))(images)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(np.asarray(normalised), VIT.normalize(images), atol=1e-6)
