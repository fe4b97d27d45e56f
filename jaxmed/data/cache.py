"""Decode once: every image, hygiene applied, written to uint8 .npy files that every epoch memory-maps.

One cache directory per (source identity, settings) — the identity is the file list with sizes and mtimes (or
the dataset fingerprint), the settings everything that changes pixels or splits — so runs reuse it and an
edited dataset or config gets a new one. It is built in a temporary directory and renamed, so a killed build
never leaves a half cache that a later run would trust. Contents:
  train.npy        (N, S, S, 3) the whole image squashed to S = max(cache_size, model input side); augmentation
                   crops from it and undoes the squash with the original size, so crops keep their aspect
  val.npy test.npy (N, h, w, 3) exactly `Preprocessor.geometry` of the decoded file: the HF processor's eval input
  meta.json        class names; per split ids, labels, original sizes; unreadable files skipped; settings
  leakage.json     duplicates across splits (leakage.py)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxmed.data import decode, leakage, splits
from jaxmed.data.preprocess import Preprocessor
from jaxmed.data.sources import Source
from jaxmed.errors import JaxmedError

VERSION = 1  # bump when the cache layout or decoding changes
GEOMETRY_FIELDS = ("processor_type", "do_resize", "size", "resample", "crop_pct", "do_center_crop", "crop_size")
log = logging.getLogger("jaxmed.data")


def directory_for(source: Source, config, preprocessor: Preprocessor) -> Path:
    """The cache directory of this source and these settings (it may not exist yet)."""
    settings = {
        "version": VERSION, "format": config.format, "source": source.identity, "grayscale": config.grayscale,
        "train_size": train_size(config, preprocessor), "class_names": list(config.get("class_names", ()) or ()),
        "geometry": {field: getattr(preprocessor, field) for field in GEOMETRY_FIELDS},
        "val_fraction": config.val_fraction, "split_seed": config.split_seed,
        "merge_train_val": config.merge_train_val, "drop_duplicates": config.drop_duplicates,
        "near_duplicate_threshold": config.near_duplicate_threshold, "dicom_frame": config.get("dicom_frame", -1),
        "group_pattern": config.get("group_pattern", ""), "strict": config.strict,
        "cv": [config.get("cv_fold", -1), config.get("cv_folds", 0)]}
    if config.get("calibration_fraction", 0.0):  # only then: caches built before the key existed stay valid
        settings["calibration_fraction"] = config.calibration_fraction
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return Path(config.cache_dir).expanduser() / f"{config.format}-{key[:16]}"


def eval_size(preprocessor: Preprocessor) -> tuple[int, int]:
    """The model input (height, width); an error when the processor's output size depends on the image."""
    sizes = {preprocessor.output_size(height, width) for height, width in ((512, 512), (480, 640), (640, 480))}
    if len(sizes) != 1:
        raise JaxmedError(f"{preprocessor.processor_type} with size={preprocessor.size} gives images of varying "
                          "size; batching needs a fixed size (set a crop or height/width)")
    return sizes.pop()


def train_size(config, preprocessor: Preprocessor) -> int:
    return max(config.cache_size, *eval_size(preprocessor))


@dataclasses.dataclass
class _Items:
    """Every item of the source, numbered across its splits."""
    origin: np.ndarray  # source split of each item
    index: np.ndarray  # index within that split
    labels: np.ndarray
    ids: list[str]
    groups: np.ndarray | None  # patient id of each item (data.group_pattern), or None


def build(directory: Path, source: Source, config, preprocessor: Preprocessor) -> None:
    counts = [len(part.ids) for part in source.splits.values()]
    items = _Items(np.repeat(list(source.splits), counts), np.concatenate([np.arange(count) for count in counts]),
                   np.concatenate([part.labels for part in source.splits.values()]).astype(np.int64),
                   [item for part in source.splits.values() for item in part.ids], None)
    if config.get("group_pattern", ""):
        names = [name for part in source.splits.values() for name in part.names()]
        items.groups = splits.patient_groups(names, config.group_pattern, strict=config.strict)
    elif any(part.groups is not None for part in source.splits.values()):  # e.g. the slices of NIfTI volumes
        items.groups = np.asarray([group for part in source.splits.values()
                                   for group in (part.groups if part.groups is not None else part.names())], object)
    folds = config.get("cv_folds", 0)
    carving = config.val_fraction > 0 and ("val" not in source.splits or config.merge_train_val or folds)
    carving = carving or config.get("calibration_fraction", 0.0) > 0  # the calibration split is carved from train
    merged = config.merge_train_val or bool(folds)
    becomes_train = (items.origin == "train") | ((items.origin == "val") & merged)
    needs_train = becomes_train
    needs_eval = ~becomes_train | (becomes_train & (carving or bool(folds)))
    temporary = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir(parents=True)
    try:
        decoded = _decode_all(temporary, source, items, needs_train, needs_eval, config, preprocessor)
        _finish(temporary, source, items, decoded, config)
        try:
            os.rename(temporary, directory)
        except OSError:  # another process finished the same cache first: theirs is as good as ours
            if not (directory / "meta.json").exists():
                raise
            shutil.rmtree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


@dataclasses.dataclass
class _Decoded:
    train_pool: np.ndarray
    eval_pool: np.ndarray
    sizes: np.ndarray  # (N, 2) original height, width
    pixel_hashes: list
    phashes: np.ndarray
    thumbnails: np.ndarray  # (N, 32, 32) uint8, confirm near duplicates
    errors: dict[int, str]


def _decode_all(temporary, source, items, needs_train, needs_eval, config, preprocessor) -> _Decoded:
    count, side, (height, width) = len(items.ids), train_size(config, preprocessor), eval_size(preprocessor)
    # Pools hold every item at both resolutions; rows nobody needs are never written (sparse files).
    result = _Decoded(np.lib.format.open_memmap(temporary / "pool_train.npy", "w+", np.uint8, (count, side, side, 3)),
                      np.lib.format.open_memmap(temporary / "pool_eval.npy", "w+", np.uint8, (count, height, width, 3)),
                      np.zeros((count, 2), np.int32), [None] * count, np.zeros(count, np.uint64),
                      np.zeros((count, 32, 32), np.uint8), {})

    def work(item: int) -> None:
        try:
            raw = source.splits[items.origin[item]].read(int(items.index[item]))
            image = decode.clean(raw, grayscale=config.grayscale)  # "L" or "RGB"
            result.sizes[item] = image.height, image.width
            result.pixel_hashes[item], result.phashes[item], result.thumbnails[item] = leakage.fingerprint(image)
            if needs_train[item]:
                resized = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))
                result.train_pool[item] = resized if resized.ndim == 3 else cv2.cvtColor(resized, cv2.COLOR_GRAY2RGB)
            if needs_eval[item]:
                result.eval_pool[item] = preprocessor.geometry(image)  # converts "L" to RGB like HF does
        except Exception as error:  # any file problem is recorded, never raised mid-build (nor mid-epoch later)
            message = str(error) if isinstance(error, decode.UnreadableImage) else f"{type(error).__name__}: {error}"
            result.errors[item] = message

    threads = config.decode_threads or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL and OpenCV release the GIL while decoding
        futures = [pool.submit(work, item) for item in range(count)]
        with tqdm(total=count, unit="img", desc=f"decoding {source.description}", mininterval=1.0) as progress:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                progress.update()
    return result


def _finish(temporary: Path, source: Source, items: _Items, decoded: _Decoded, config) -> None:
    skipped = [{"id": items.ids[item], "error": error} for item, error in sorted(decoded.errors.items())]
    if skipped:
        listing = "; ".join(f"{entry['id']} ({entry['error']})" for entry in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        if config.strict:
            raise JaxmedError(f"{len(skipped)} unreadable images in {source.description}: {listing}{more} — remove "
                              "or replace them, or set data.strict=False to skip them")
        log.warning("skipping %d unreadable images: %s%s", len(skipped), listing, more)
    usable = np.ones(len(items.ids), bool)
    usable[list(decoded.errors)] = False
    _check_classes(source, items, usable)
    rows = splits.plan(items.origin, items.labels, usable, val_fraction=config.val_fraction,
                       seed=config.split_seed, merge_train_val=config.merge_train_val, groups=items.groups,
                       fold=config.get("cv_fold", -1), folds=config.get("cv_folds", 0),
                       calibration_fraction=config.get("calibration_fraction", 0.0))
    report, leaked = leakage.check(rows, decoded.pixel_hashes, decoded.phashes, decoded.thumbnails, items.ids,
                                   config.near_duplicate_threshold)
    if items.groups is not None:
        report["patients"] = leakage.shared_patients(rows, items.groups, items.ids, config.group_pattern)
    report["dropped_from_train"] = 0
    if config.drop_duplicates and len(leaked):
        rows["train"] = rows["train"][~np.isin(rows["train"], leaked)]
        report["dropped_from_train"] = len(leaked)
    (temporary / "leakage.json").write_text(json.dumps(report, indent=1))
    meta = {"version": VERSION, "source": source.description, "class_names": source.class_names, "splits": {},
            "skipped": skipped, "grayscale": config.grayscale}
    for split, split_rows in rows.items():
        pool = decoded.train_pool if split == "train" else decoded.eval_pool
        images = np.lib.format.open_memmap(temporary / f"{split}.npy", "w+", np.uint8,
                                           (len(split_rows),) + pool.shape[1:])
        for start in range(0, len(split_rows), 256):
            images[start:start + 256] = pool[split_rows[start:start + 256]]
        images.flush()
        del images
        meta["splits"][split] = {"ids": [items.ids[row] for row in split_rows],
                                 "labels": items.labels[split_rows].tolist(),
                                 "sizes": decoded.sizes[split_rows].tolist(), "model_ready": split != "train",
                                 "groups": None if items.groups is None else items.groups[split_rows].tolist()}
    (temporary / "meta.json").write_text(json.dumps(meta))
    del decoded.train_pool, decoded.eval_pool
    for name in ("pool_train.npy", "pool_eval.npy"):
        (temporary / name).unlink()


def _check_classes(source: Source, items: _Items, usable: np.ndarray) -> None:
    """Every class needs training images, and a class a split has files for needs at least one readable."""
    for split, part in source.splits.items():
        in_split = items.origin == split
        for label in np.unique(part.labels):
            if not np.any(in_split & usable & (items.labels == label)):
                raise JaxmedError(f"class {source.class_names[label]!r} of {part.where} has no readable images "
                                  "(see the unreadable files listed above)")
    trained = np.unique(items.labels[(items.origin == "train") & usable])
    missing = [name for label, name in enumerate(source.class_names) if label not in trained]
    if missing:
        raise JaxmedError(f"classes {missing} have no training images in {source.description}")
