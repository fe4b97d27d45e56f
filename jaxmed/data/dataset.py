"""`load_dataset`: config → source → cache (built once) → memory-mapped splits, with the count table logged."""

from __future__ import annotations

import csv
import dataclasses
import io
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from jaxmed.data import cache, hosts, sources, splits
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.data")


@dataclasses.dataclass
class Split:
    name: str
    images: np.ndarray  # uint8 (N, H, W, 3), memory-mapped (GrayImages: stored (N, H, W, 1), read as 3 channels)
    labels: np.ndarray  # int32 (N,)
    ids: list[str]  # file path or source id of each image
    sizes: np.ndarray  # int32 (N, 2): height, width of the decoded original (augmentation undoes the squash)
    model_ready: bool  # images are the model's eval input already (val/test); else the augmentation cache (train)
    path: str  # the .npy file, so worker processes re-open the memmap instead of receiving a pickled copy
    grayscale: bool = False  # the three channels are equal: augmentation warps one and replicates it
    groups: list[str] | None = None  # patient id of each image (data.group_pattern), or None

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class Dataset:
    splits: dict[str, Split]  # "train", and "val" / "test" when there are any
    class_names: list[str]
    directory: Path  # the cache directory: meta.json, leakage.json, the .npy files
    skipped: list[dict]  # unreadable files: {"id", "error"}
    leakage: dict  # the leakage.json report

    def summary(self) -> str:
        return splits.count_table(self.class_names, {name: split.labels for name, split in self.splits.items()})

    def splits_csv(self) -> str:
        """One row per image — id, split, class, group (patient id; empty without data.group_pattern) — so a reader
        can audit the split; the same config and seed give the same text byte for byte."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "split", "class", "group"])
        for name, split in self.splits.items():
            groups = split.groups or [""] * len(split)
            for image_id, label, group in zip(split.ids, split.labels, groups):
                writer.writerow([image_id, name, self.class_names[label], group])
        return buffer.getvalue()


class GrayImages:
    """A (N, H, W, 1) memory map of gray images read as (N, H, W, 3): the cache stores the channel once; readers
    that index it get the three equal channels the model sees (the batch pipeline reads the file itself)."""

    def __init__(self, stored: np.ndarray):
        self.stored = stored
        self.shape, self.dtype, self.ndim = (*stored.shape[:-1], 3), stored.dtype, stored.ndim

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index) -> np.ndarray:
        return np.repeat(np.asarray(self.stored[index]), 3, axis=-1)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)


def load_dataset(config, preprocessor: Preprocessor) -> Dataset:
    """Builds the cache on first use (decoding in parallel; on several hosts each decodes its share), then
    memory-maps it; logs the per-class counts."""
    group = hosts.Group.current()
    pointer = _pointer(config, preprocessor)
    directory, source = None, None
    if config.get("trust_cache", False) and pointer.exists():
        directory = pointer.parent.parent / pointer.read_text().strip()
        directory = directory if (directory / "meta.json").exists() else None
    if "0" in group.share("trusted", str(int(directory is not None)), "to look for the cache"):
        directory = None  # every host must take the same path
    if directory is not None:
        log.info("data.trust_cache=True: using the decoded cache %s without checking the files", directory)
    if directory is None:
        started = time.monotonic()
        source = sources.open_source(config)
        directory = cache.directory_for(source, config, preprocessor)
        have = (directory / "meta.json").exists()
        if have:
            log.info("using the decoded cache %s (listing and stat'ing every file of %s took %.2f s; "
                     "data.trust_cache=True skips that)", directory, source.description, time.monotonic() - started)
        if "0" in group.share("have_cache", str(int(have)), "to look for the cache"):
            log.info("decoding %s into %s", source.description, directory)
            cache.build(directory, source, config, preprocessor, group)
        _write_pointer(pointer, directory)
    dataset = open_cache(directory)
    description = source.description if source else json.loads((directory / "meta.json").read_text())["source"]
    if config.strict and dataset.skipped:
        raise JaxmedError(f"{len(dataset.skipped)} unreadable images in {description}, e.g. "
                          f"{dataset.skipped[0]['id']} ({dataset.skipped[0]['error']}) — remove or replace them, "
                          "or set data.strict=False to skip them")
    log.info("%s: images per split and class\n%s", description, dataset.summary())
    patients = dataset.leakage.get("patients")
    if patients:
        for pair, found in patients["pairs"].items():
            if found["shared_patients"]:
                log.warning("%s: %d patients have images in both %s (see %s/leakage.json)", description,
                            found["shared_patients"], pair, directory)
    for pair, found in dataset.leakage.get("pairs", {}).items():
        if found["exact"] or found["near"]:
            log.warning("%s: %d exact and %d near-duplicate pairs across %s (see %s/leakage.json%s)",
                        description, found["exact"], found["near"], pair, directory,
                        "; dropped from train" if config.drop_duplicates else "; data.drop_duplicates=True drops them")
    return dataset


def open_cache(directory: Path) -> Dataset:
    meta = json.loads((directory / "meta.json").read_text())
    split_objects = {}
    for name, entry in meta["splits"].items():
        path = directory / f"{name}.npy"
        images = np.load(path, mmap_mode="r")
        images = GrayImages(images) if images.shape[-1] == 1 else images  # gray stored once
        split_objects[name] = Split(name, images, np.asarray(entry["labels"], np.int32), entry["ids"],
                                    np.asarray(entry["sizes"], np.int32).reshape(-1, 2), entry["model_ready"], str(path), meta["grayscale"], entry.get("groups"))
    leakage_report = json.loads((directory / "leakage.json").read_text())
    return Dataset(split_objects, meta["class_names"], directory, meta["skipped"], leakage_report)


def _pointer(config, preprocessor: Preprocessor) -> Path:
    """Where the name of the last cache built for this data.root and these settings is kept (data.trust_cache)."""
    key = json.dumps({**cache.settings(config, preprocessor), "root": config.root}, sort_keys=True, default=str)
    return (Path(config.cache_dir).expanduser() / ".latest" /
            f"{config.format}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def _write_pointer(pointer: Path, directory: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    partial = pointer.with_name(f"{pointer.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.write_text(directory.name)
    os.replace(partial, pointer)
