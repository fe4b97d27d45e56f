"""Decode once: every image, hygiene applied, written to uint8 .npy files that every epoch memory-maps.

One cache directory per (source identity, settings) — the identity is the file list with sizes and mtimes, by
path relative to the data root so hosts that mount the data at different paths share it (or the dataset
fingerprint), the settings everything that changes pixels or splits — so runs reuse it and an edited dataset or
config gets a new one. The splits are planned from the file list first, so each image is decoded once, straight
into its split's file at the resolution that split needs; unreadable files and dropped duplicates are then
removed in place (peak disk ≈ the final size; cache_files.py). On several hosts each decodes its share of the
images into the same files (hosts.py), and process 0 finishes the cache. It is built in a temporary directory and
renamed, so a killed build never leaves a half cache that a later run would trust. Contents:
  train.npy        (N, S, S, C) the whole image squashed to S = max(cache_size, model input side); augmentation
                   crops from it and undoes the squash with the original size, so crops keep their aspect
  val.npy test.npy (N, h, w, C) exactly `Preprocessor.geometry` of the decoded file: the HF processor's eval input
  meta.json        class names; per split ids, labels, original sizes; unreadable files skipped; settings
  leakage.json     duplicates across splits (leakage.py)
C is 1 with data.grayscale (the gray channel is stored once and replicated when batches are made) and 3 otherwise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxmed.data import cache_files, decode, hosts, leakage, splits
from jaxmed.data.preprocess import Preprocessor
from jaxmed.data.sources import Source
from jaxmed.errors import JaxmedError

VERSION = 2  # bump when the cache layout or decoding changes (2: gray stored once, relative-path identity)
GEOMETRY_FIELDS = ("processor_type", "do_resize", "size", "resample", "crop_pct", "do_center_crop", "crop_size")
QUEUED_PER_THREAD = 4  # decode jobs submitted ahead of the threads: memory bounded whatever N
FINGERPRINTS = {"sizes.npy": ((2,), np.int32), "phash.npy": ((), np.uint64), "thumbnails.npy": ((32, 32), np.uint8),
                "pixel_hash.npy": ((16,), np.uint8), "decoded.npy": ((), np.uint8)}  # per item; 1 = decoded
log = logging.getLogger("jaxmed.data")


def settings(config, preprocessor: Preprocessor) -> dict:
    """Everything but the source's identity that changes the cache's pixels or splits."""
    calibration = config.get("calibration_fraction", 0.0)  # only when set: older caches' keys stay the same
    return ({"calibration_fraction": calibration} if calibration else {}) | {
        "version": VERSION, "format": config.format, "grayscale": config.grayscale,
        "train_size": train_size(config, preprocessor), "class_names": list(config.get("class_names", ()) or ()),
        "geometry": {field: getattr(preprocessor, field) for field in GEOMETRY_FIELDS},
        "val_fraction": config.val_fraction, "split_seed": config.split_seed,
        "merge_train_val": config.merge_train_val, "drop_duplicates": config.drop_duplicates,
        "near_duplicate_threshold": config.near_duplicate_threshold, "dicom_frame": config.get("dicom_frame", -1),
        "group_pattern": config.get("group_pattern", ""), "strict": config.strict,
        "cv": [config.get("cv_fold", -1), config.get("cv_folds", 0)],
        "fast_decode": config.get("fast_decode", False)}


def directory_for(source: Source, config, preprocessor: Preprocessor) -> Path:
    """The cache directory of this source and these settings (it may not exist yet)."""
    key = hashlib.sha256(json.dumps({**settings(config, preprocessor), "source": source.identity}, sort_keys=True,
                                    default=str).encode()).hexdigest()
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


def _items(source: Source, config) -> _Items:
    counts = [len(part.ids) for part in source.splits.values()]
    items = _Items(np.repeat(list(source.splits), counts), np.concatenate([np.arange(count) for count in counts]),
                   np.concatenate([part.labels for part in source.splits.values()]).astype(np.int64),
                   [item for part in source.splits.values() for item in part.ids], None)
    if config.get("group_pattern", ""):
        names = [name for part in source.splits.values() for name in part.names()]
        items.groups = splits.patient_groups(names, config.group_pattern, strict=config.strict)
    elif any(getattr(part, "groups", None) is not None for part in source.splits.values()):  # NIfTI volume slices
        items.groups = np.asarray([group for part in source.splits.values()
                                   for group in (part.groups if part.groups is not None else part.names())], object)
    return items


def _plan(items: _Items, config, usable: np.ndarray) -> dict[str, np.ndarray]:
    calibration = config.get("calibration_fraction", 0.0)  # a held-out "calibration" split carved from train
    return splits.plan(items.origin, items.labels, usable, val_fraction=config.val_fraction,
                       seed=config.split_seed, merge_train_val=config.merge_train_val, groups=items.groups,
                       fold=config.get("cv_fold", -1), folds=config.get("cv_folds", 0),
                       **({"calibration_fraction": calibration} if calibration else {}))


def layout(rows: dict[str, np.ndarray], count: int, config, preprocessor: Preprocessor) -> dict[str, tuple]:
    """{file name: (shape, dtype)} of everything a build writes: the split files and the per-item fingerprints."""
    channels = 1 if config.grayscale else 3
    side, (height, width) = train_size(config, preprocessor), eval_size(preprocessor)
    files = {f"{split}.npy": ((len(split_rows), side, side, channels) if split == "train"
                              else (len(split_rows), height, width, channels), np.uint8)
             for split, split_rows in rows.items()}
    return files | {name: ((count, *shape), dtype) for name, (shape, dtype) in FINGERPRINTS.items()}


def build(directory: Path, source: Source, config, preprocessor: Preprocessor, group: hosts.Group | None = None
          ) -> None:
    """Builds the cache; with a Group of several processes each decodes its share and process 0 finishes it."""
    group = group or hosts.Group()
    items = _items(source, config)
    rows = _plan(items, config, np.ones(len(items.ids), bool))  # unreadable files are removed after decoding
    files = layout(rows, len(items.ids), config, preprocessor)
    lock, status = None, ""
    if group.leader:
        try:
            temporary, lock = _prepare(directory, files)
            status = str(temporary)
        except Exception as error:
            group.broadcast("prepared", f"error:{error}")
            raise
    status = group.broadcast("prepared", status, "to allocate the cache files")
    if status.startswith("error:"):
        raise JaxmedError(status.removeprefix("error:"))
    temporary = Path(status)
    if "0" in group.share("sees", str(int(_appears(temporary / cache_files.LOCK))), "to look for the files"):
        log.warning("data.cache_dir %s is not shared by all %d processes: each decodes the whole dataset into its "
                    "own cache (share one folder, e.g. on NFS or Filestore, to decode each image once)",
                    directory.parent, group.count)
        if group.leader:
            _discard(temporary, lock)
        if not (directory / "meta.json").exists():
            build(directory, source, config, preprocessor)
        return
    try:
        _decode_share(temporary, source, items, rows, config, preprocessor, group)
    except BaseException as error:
        group.share("decoded", f"error:process {group.index}: {type(error).__name__}: {error}")
        if group.leader:
            _discard(temporary, lock)
        raise
    failures = [state for state in group.share("decoded", "ok", "to decode its share") if state != "ok"]
    if group.leader:
        try:
            if failures:
                raise JaxmedError(failures[0].removeprefix("error:"))
            _finish(temporary, source, items, rows, config)
            try:
                os.rename(temporary, directory)
            except OSError:  # another job finished the same cache first: theirs is as good as ours
                if not (directory / "meta.json").exists():
                    raise
                shutil.rmtree(temporary)
            else:
                (directory / cache_files.LOCK).unlink()
            os.close(lock)
        except BaseException as error:
            _discard(temporary, lock)
            group.broadcast("finished", f"error:{error}")
            raise
    status = group.broadcast("finished", "ok", "to finish the cache")
    if status != "ok" and not group.leader:
        raise JaxmedError(failures[0].removeprefix("error:") if failures else status.removeprefix("error:"))


def _appears(path: Path, seconds: float = 10.0) -> bool:
    """Whether `path` exists, waiting a little: NFS clients may cache a folder's old listing for seconds."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _prepare(directory: Path, files: dict[str, tuple]) -> tuple[Path, int]:
    """The build folder, locked, every file allocated for real after a free-space check."""
    cache_dir = directory.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    for folder in cache_files.remove_stale(cache_dir):
        log.info("removed %s, the temporary folder of a build that died", folder)
    cache_files.check_free_space(cache_dir, sum(cache_files.nbytes(*spec) for spec in files.values()))
    temporary = cache_dir / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    lock = cache_files.hold_lock(temporary)
    try:
        for name, (shape, dtype) in files.items():
            cache_files.allocate(temporary / name, shape, dtype)
    except BaseException:
        _discard(temporary, lock)
        raise
    return temporary, lock


def _discard(temporary: Path, lock: int | None) -> None:
    shutil.rmtree(temporary, ignore_errors=True)
    if lock is not None:
        with contextlib.suppress(OSError):
            os.close(lock)


def _decode_share(temporary: Path, source: Source, items: _Items, rows: dict[str, np.ndarray], config,
                  preprocessor: Preprocessor, group: hosts.Group) -> None:
    """Decodes this process's contiguous share of all (split, position, item) jobs into the build's files."""
    jobs = [(split, position, int(item)) for split, split_rows in rows.items()
            for position, item in enumerate(split_rows)]
    share = jobs[group.index * len(jobs) // group.count:(group.index + 1) * len(jobs) // group.count]
    side = train_size(config, preprocessor)
    fast = config.get("fast_decode", False)
    writers = {name: cache_files.Rows(temporary / name) for name in [f"{split}.npy" for split in rows]
               + list(FINGERPRINTS)}
    errors = {}

    def work(split: str, position: int, item: int) -> None:
        try:
            reduce_to = side if split == "train" or fast else 0  # eval pixels stay bit-exact unless fast_decode
            read = source.splits[items.origin[item]].read
            with decode.reduced_scale(reduce_to):
                raw = read(int(items.index[item]))
            image = decode.clean(raw, grayscale=config.grayscale)  # "L" or "RGB"
            fingerprinted = image
            if not reduce_to and isinstance(raw, Image.Image) and decode.draftable(raw, side):
                with decode.reduced_scale(side):  # as a train copy of this file would be, so duplicates match
                    fingerprinted = decode.clean(read(int(items.index[item])), grayscale=config.grayscale)
            exact, phash, thumbnail = leakage.fingerprint(fingerprinted)
            if split == "train":
                pixels = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))
            else:
                pixels = preprocessor.geometry(image)  # converts "L" to RGB like HF does: its channels are equal
            pixels = pixels.reshape(*pixels.shape[:2], -1)[..., :1 if config.grayscale else 3]
            writers[f"{split}.npy"].write(position, pixels)
            writers["sizes.npy"].write(item, decode.original_size(image)[::-1])  # height, width
            writers["phash.npy"].write(item, phash)
            writers["thumbnails.npy"].write(item, thumbnail)
            writers["pixel_hash.npy"].write(item, np.frombuffer(bytes.fromhex(exact), np.uint8))
            writers["decoded.npy"].write(item, 1)
        except Exception as error:  # any file problem is recorded, never raised mid-build (nor mid-epoch later)
            message = str(error) if isinstance(error, decode.UnreadableImage) else f"{type(error).__name__}: {error}"
            errors[item] = message

    threads = config.decode_threads or os.cpu_count() or 1
    where = f" (process {group.index} of {group.count}: {len(share)} of {len(jobs)})" if group.count > 1 else ""
    try:
        with (concurrent.futures.ThreadPoolExecutor(threads) as pool,  # PIL/OpenCV release the GIL when decoding
              tqdm(total=len(share), unit="img", desc=f"decoding {source.description}{where}",
                   mininterval=1.0) as progress):
            pending = set()
            for job in share:
                if len(pending) >= QUEUED_PER_THREAD * threads:
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        future.result()
                    progress.update(len(done))
                pending.add(pool.submit(work, *job))
            for future in concurrent.futures.as_completed(pending):
                future.result()
                progress.update()
    finally:
        for writer in writers.values():
            writer.close()
    (temporary / f"errors-{group.index}.json").write_text(json.dumps(errors))


def _finish(temporary: Path, source: Source, items: _Items, rows: dict[str, np.ndarray], config) -> None:
    """Unreadable files and dropped duplicates removed in place, leakage.json and meta.json written."""
    errors = {}
    for path in sorted(temporary.glob("errors-*.json")):
        errors.update({int(item): message for item, message in json.loads(path.read_text()).items()})
        path.unlink()
    skipped = [{"id": items.ids[item], "error": error} for item, error in sorted(errors.items())]
    if skipped:
        listing = "; ".join(f"{entry['id']} ({entry['error']})" for entry in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        if config.strict:
            raise JaxmedError(f"{len(skipped)} unreadable images in {source.description}: {listing}{more} — remove "
                              "or replace them, or set data.strict=False to skip them")
        log.warning("skipping %d unreadable images: %s%s", len(skipped), listing, more)
    usable = np.load(temporary / "decoded.npy") == 1
    unplanned = np.ones(len(items.ids), bool)  # e.g. the source's test split in a cross-validation fold: not read
    unplanned[np.concatenate(list(rows.values()))] = False
    _check_classes(source, items, usable | unplanned)
    kept = {split: np.flatnonzero(usable[split_rows]) for split, split_rows in rows.items()}
    final = {split: rows[split][positions] for split, positions in kept.items()}
    pixel_hashes = [digest.tobytes().hex() for digest in np.load(temporary / "pixel_hash.npy")]
    report, leaked = leakage.check(final, pixel_hashes, np.load(temporary / "phash.npy"),
                                   np.load(temporary / "thumbnails.npy", mmap_mode="r"), items.ids,
                                   config.near_duplicate_threshold)
    if items.groups is not None:
        report["patients"] = leakage.shared_patients(final, items.groups, items.ids, config.group_pattern)
    report["dropped_from_train"] = 0
    if config.drop_duplicates and len(leaked) and "train" in final:
        kept["train"] = kept["train"][~np.isin(final["train"], leaked)]
        final["train"] = rows["train"][kept["train"]]
        report["dropped_from_train"] = len(leaked)
    (temporary / "leakage.json").write_text(json.dumps(report, indent=1))
    sizes = np.load(temporary / "sizes.npy")
    meta = {"version": VERSION, "source": source.description, "class_names": source.class_names, "splits": {},
            "skipped": skipped, "grayscale": config.grayscale}
    for split, split_rows in final.items():
        if not len(split_rows):
            (temporary / f"{split}.npy").unlink()
            continue
        cache_files.compact(temporary / f"{split}.npy", kept[split])
        meta["splits"][split] = {"ids": [items.ids[row] for row in split_rows],
                                 "labels": items.labels[split_rows].tolist(),
                                 "sizes": sizes[split_rows].tolist(), "model_ready": split != "train",
                                 "groups": None if items.groups is None else items.groups[split_rows].tolist()}
    (temporary / "meta.json").write_text(json.dumps(meta))
    for name in FINGERPRINTS:
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
