"""`load_dataset`: config → source → cache (built once) → memory-mapped splits, with the count table logged."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np

from jaxmed.data import cache, sources, splits
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.data")


@dataclasses.dataclass
class Split:
    name: str
    images: np.ndarray  # uint8 (N, H, W, 3), memory-mapped
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


def load_dataset(config, preprocessor: Preprocessor) -> Dataset:
    """Builds the cache on first use (decoding in parallel), then memory-maps it; logs the per-class counts."""
    source = sources.open_source(config)
    directory = cache.directory_for(source, config, preprocessor)
    if (directory / "meta.json").exists():
        log.info("using the decoded cache %s", directory)
    else:
        log.info("decoding %s into %s", source.description, directory)
        cache.build(directory, source, config, preprocessor)
    dataset = open_cache(directory)
    if config.strict and dataset.skipped:
        raise JaxmedError(f"{len(dataset.skipped)} unreadable images in {source.description}, e.g. "
                          f"{dataset.skipped[0]['id']} ({dataset.skipped[0]['error']}) — remove or replace them, "
                          "or set data.strict=False to skip them")
    log.info("%s: images per split and class\n%s", source.description, dataset.summary())
    patients = dataset.leakage.get("patients")
    if patients:
        for pair, found in patients["pairs"].items():
            if found["shared_patients"]:
                log.warning("%s: %d patients have images in both %s (see %s/leakage.json)", source.description,
                            found["shared_patients"], pair, directory)
    for pair, found in dataset.leakage.get("pairs", {}).items():
        if found["exact"] or found["near"]:
            log.warning("%s: %d exact and %d near-duplicate pairs across %s (see %s/leakage.json%s)",
                        source.description, found["exact"], found["near"], pair, directory,
                        "; dropped from train" if config.drop_duplicates else "; data.drop_duplicates=True drops them")
    return dataset


def open_cache(directory: Path) -> Dataset:
    meta = json.loads((directory / "meta.json").read_text())
    split_objects = {}
    for name, entry in meta["splits"].items():
        path = directory / f"{name}.npy"
        split_objects[name] = Split(name, np.load(path, mmap_mode="r"), np.asarray(entry["labels"], np.int32),
                                    entry["ids"], np.asarray(entry["sizes"], np.int32).reshape(-1, 2),
                                    entry["model_ready"], str(path), meta["grayscale"], entry.get("groups"))
    leakage_report = json.loads((directory / "leakage.json").read_text())
    return Dataset(split_objects, meta["class_names"], directory, meta["skipped"], leakage_report)
