"""The cache at scale: gray stored once with the same model inputs, peak disk ≈ the final size, a full disk is a
clear error, dead builds are cleaned up, a bounded decode queue, a mount-independent key, data.trust_cache, and
large JPEGs decoded at reduced scale for training only."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxmed.data import cache, cache_files, decode, load_dataset, sources
from jaxmed.data.dataset import Split
from jaxmed.data.pipeline import eval_batches, train_iterator
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError
from tests.test_data_cache import VIT, data_config, make_folder, smooth_jpeg

VIT64 = Preprocessor(processor_type="ViTImageProcessor", size={"height": 64, "width": 64})


def disk_bytes(folder) -> int:
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def test_gray_is_stored_once_and_batches_are_the_same_as_three_stored_channels(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    dataset = load_dataset(data_config(tmp_path, root, grayscale=True, val_fraction=0.25), VIT)
    settings = data_config(tmp_path, root).augment
    for name, split in dataset.splits.items():
        stored = np.load(split.path, mmap_mode="r")
        assert stored.shape[-1] == 1 and split.images.shape == (*stored.shape[:-1], 3)
        tripled = tmp_path / f"{name}3.npy"
        np.save(tripled, np.repeat(stored, 3, axis=-1))  # the layout before: three equal channels on disk
        old = Split(name, np.load(tripled, mmap_mode="r"), split.labels, split.ids, split.sizes, split.model_ready,
                    str(tripled), True, split.groups)
        np.testing.assert_array_equal(split.images[[0, 1]], old.images[[0, 1]])
        for new_batch, old_batch in zip(eval_batches(split, VIT, batch_size=4), eval_batches(old, VIT, batch_size=4)):
            np.testing.assert_array_equal(new_batch["image"], old_batch["image"])
        if name == "train":
            new_iterator, old_iterator = (train_iterator(part, VIT, batch_size=4, seed=3, augment_settings=settings,
                                                         read_threads=1) for part in (split, old))
            for _ in range(3):
                np.testing.assert_array_equal(next(new_iterator)["image"], next(old_iterator)["image"])


def test_peak_disk_is_within_1_2_times_the_final_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for split, count in (("train", 16), ("test", 5)):
        for label in ("a", "b"):
            for index in range(count):
                smooth_jpeg(root / split / label / f"{index}.jpg", seed=hash((split, label, index)) % 1000,
                            size=(120, 160))
    cache_dir = tmp_path / "cache"
    peak = [0]

    def measured(unlink):
        def wrapper(self, *args, **kwargs):  # files are only ever removed after the cache is at its largest
            if cache_dir in self.parents:
                peak[0] = max(peak[0], disk_bytes(cache_dir))
            return unlink(self, *args, **kwargs)
        return wrapper
    monkeypatch.setattr(type(cache_dir), "unlink", measured(type(cache_dir).unlink))
    dataset = load_dataset(data_config(tmp_path, root, grayscale=True, val_fraction=0.2, cache_size=160), VIT64)
    final = disk_bytes(dataset.directory)
    assert peak[0] <= 1.2 * final, (peak[0], final)


def test_a_full_disk_is_a_one_line_error_naming_both_sizes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    monkeypatch.setattr(cache_files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(JaxmedError) as error:
        load_dataset(data_config(tmp_path, root), VIT)
    message = str(error.value)
    assert "\n" not in message and "1,000 bytes" in message and "data.cache_dir" in message
    assert "needs" in message and str(tmp_path / "cache") in message


def test_files_are_allocated_before_anything_is_written(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    decode_share, checked = cache._decode_share, []

    def check_allocated(temporary, *args):
        for path in temporary.glob("*.npy"):
            assert path.stat().st_blocks * 512 >= path.stat().st_size, path  # no holes: a full disk fails earlier
            checked.append(path.name)
        return decode_share(temporary, *args)
    monkeypatch.setattr(cache, "_decode_share", check_allocated)
    load_dataset(data_config(tmp_path, root), VIT)
    assert "train.npy" in checked and "test.npy" in checked

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache_files.os, "posix_fallocate", no_space)
    with pytest.raises(JaxmedError, match="no space left .* data.cache_dir"):
        load_dataset(data_config(tmp_path, root, cache_size=48), VIT)
    assert not [path for path in (tmp_path / "cache").iterdir() if ".tmp-" in path.name]


def test_dead_builds_are_removed_and_a_live_one_is_kept(tmp_path):
    cache_dir = tmp_path / "cache"
    live, dead = cache_dir / ".imagefolder-1.tmp-1-aa", cache_dir / ".imagefolder-2.tmp-2-bb"
    live.mkdir(parents=True)
    dead.mkdir()
    (dead / cache_files.LOCK).write_text("otherhost 2\n")  # its process died: nobody holds the lock
    lock = cache_files.hold_lock(live)
    try:
        assert cache_files.remove_stale(cache_dir) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        os.close(lock)


def test_decode_jobs_are_queued_a_few_per_thread(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=10)
    most = [0]

    class Counting(cache.concurrent.futures.ThreadPoolExecutor):
        pending = 0

        def submit(self, function, *args):
            Counting.pending += 1
            most[0] = max(most[0], Counting.pending)

            def run():
                try:
                    return function(*args)
                finally:
                    Counting.pending -= 1
            return super().submit(run)
    monkeypatch.setattr(cache.concurrent.futures, "ThreadPoolExecutor", Counting)
    load_dataset(data_config(tmp_path, root, decode_threads=1), VIT)
    assert 0 < most[0] <= cache.QUEUED_PER_THREAD + 1  # 40 images, never all submitted at once


def test_the_key_ignores_where_the_data_is_mounted_and_trust_cache_skips_the_listing(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    first = load_dataset(data_config(tmp_path, root), VIT).directory
    elsewhere = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(root, elsewhere)  # copy2: same relative paths, sizes and mtimes
    assert load_dataset(data_config(tmp_path, elsewhere), VIT).directory == first

    def no_listing(config):
        raise AssertionError("data.trust_cache=True should not list the files")
    monkeypatch.setattr(sources, "open_source", no_listing)
    trusted = load_dataset(data_config(tmp_path, elsewhere, trust_cache=True), VIT)
    assert trusted.directory == first and len(trusted.splits["train"]) == 8
    with pytest.raises(AssertionError, match="should not list"):
        load_dataset(data_config(tmp_path, elsewhere), VIT)


def test_large_jpegs_are_decoded_at_reduced_scale_for_training_only(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    big = smooth_jpeg(root / "train" / "glioma" / "big.jpg", seed=7, size=(768, 1024))
    (root / "test" / "glioma" / "big_copy.jpg").write_bytes(big.read_bytes())  # an exact duplicate across splits
    with decode.reduced_scale(64):
        reduced = decode.clean(decode.open_image(big), grayscale=False)
    assert reduced.size == (128, 96) and decode.original_size(reduced) == (1024, 768)  # 1/8: both sides ≥ 64

    dataset = load_dataset(data_config(tmp_path, root, cache_size=64), VIT)
    train, test = dataset.splits["train"], dataset.splits["test"]
    assert train.sizes[train.ids.index(str(big))].tolist() == [768, 1024]  # augmentation undoes the true aspect
    for row, path in enumerate(test.ids):  # eval stays the processor's geometry of the full decode, to the bit
        np.testing.assert_array_equal(test.images[row], VIT.geometry(Image.open(path).convert("RGB")))
    assert dataset.leakage["pairs"]["train-test"]["exact"] == 1  # fingerprints agree across decode scales

    fast = load_dataset(data_config(tmp_path, root, cache_size=64, fast_decode=True), VIT)
    assert fast.directory != dataset.directory and fast.leakage["pairs"]["train-test"]["exact"] == 1


def test_reduced_scale_leaves_other_formats_and_small_jpegs_alone(tmp_path):
    small = smooth_jpeg(tmp_path / "small.jpg", seed=1, size=(100, 100))
    buffer = io.BytesIO()
    Image.open(smooth_jpeg(tmp_path / "big.jpg", seed=2, size=(512, 512))).save(buffer, format="PNG")
    with decode.reduced_scale(64):
        assert decode.open_image(small).size == (100, 100)
        assert decode.open_image(buffer.getvalue()).size == (512, 512)
