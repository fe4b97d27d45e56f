"""Which image goes to train, val and test: validation is carved from train exactly as scikit-learn's stratified
`train_test_split` (seed 42 by default, as the reference notebooks), optionally after merging train and val; with a
patient key (`data.group_pattern`) no patient is on both sides; cross-validation folds hold out one part of
train+val as the fold's test split."""

from __future__ import annotations

import logging
import re

import numpy as np

from jaxmed.errors import JaxmedError

SPLITS = ("train", "val", "test")
log = logging.getLogger("jaxmed.data")


def patient_groups(names: list[str], pattern: str, *, strict: bool) -> np.ndarray:
    """The patient (or study) id of each image: the first capture group of `pattern` searched in its name (the path
    relative to its split folder). Unmatched names are an error when strict, else each its own group (logged);
    a pattern that matches nothing is always an error."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise JaxmedError(f"data.group_pattern={pattern!r} is not a regular expression: {error}") from None
    if regex.groups < 1:
        raise JaxmedError(f"data.group_pattern={pattern!r} has no capture group: put the patient id in (…)")
    groups, unmatched = [], []
    for name in names:
        found = regex.search(name)
        if found and found.group(1):
            groups.append(found.group(1))
        else:
            unmatched.append(name)
            groups.append(f"unmatched:{name}")
    if unmatched:
        examples = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        if len(unmatched) == len(names):
            raise JaxmedError(f"data.group_pattern={pattern!r} matches none of the {len(names)} images (e.g. "
                              f"{examples}); its first capture group must find the patient id in each path")
        if strict:
            raise JaxmedError(f"data.group_pattern={pattern!r} does not match {len(unmatched)} of {len(names)} "
                              f"images: {examples} — fix the pattern, or set data.strict=False to give each its "
                              "own group")
        log.warning("data.group_pattern matched no patient id in %d of %d images (each is its own group): %s",
                    len(unmatched), len(names), examples)
    return np.asarray(groups, dtype=object)


def carve_validation(labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None, *,
                     key: str = "data.val_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val) into `labels`, in scikit-learn's order: the same call the reference makes. With
    groups, StratifiedGroupKFold's first of round(1 / fraction) folds: stratified, and no group on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split  # 2 s to import: only when building

    try:
        if groups is None:
            return train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
        folds = max(2, round(1 / fraction))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = next(splitter.split(np.zeros(len(labels)), labels, groups))
        log.info("%s carved by patient: %d of %d images (%d patients of %d), 1 of %d stratified group folds",
                 key, len(val), len(labels), len(set(groups[val])), len(set(groups)), folds)
        return train, val
    except ValueError as error:
        raise JaxmedError(f"cannot carve a stratified held-out split ({key}={fraction}) from "
                          f"{len(labels)} training images: {error}") from None


def fold_membership(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """The cross-validation fold (0..folds-1) of each image: stratified, and by patient when groups are given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    splitter = (StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) if groups is None else
                StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed))
    membership = np.full(len(labels), -1)
    try:
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            membership[held_out] = fold
    except ValueError as error:
        raise JaxmedError(f"cannot make {folds} stratified folds of {len(labels)} images: {error}") from None
    return membership


def plan(origin: np.ndarray, labels: np.ndarray, usable: np.ndarray, *, val_fraction: float, seed: int,
         merge_train_val: bool, groups: np.ndarray | None = None, fold: int = -1,
         folds: int = 0, calibration_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Rows of each split, as indices into the source's items; `origin` names each item's source split.

    The source's own val split is kept unless merge_train_val (the Kermany protocol: its val has 16 images);
    without a val split, val_fraction of train is carved off (none if val_fraction is 0). A cross-validation fold
    (`fold` of `folds`) merges train and val, holds fold `fold` out as its test split, and carves val from the rest.
    calibration_fraction > 0 then carves a "calibration" split from what is left of train, as val is carved: held
    out images that choose nothing (no checkpoint, no temperature), for conformal prediction sets.
    """
    rows = {split: np.flatnonzero((origin == split) & usable) for split in SPLITS}
    if (merge_train_val or folds) and len(rows["val"]):
        rows["train"], rows["val"] = np.concatenate([rows["train"], rows["val"]]), rows["val"][:0]
    if folds:
        pool = rows["train"]
        membership = fold_membership(labels[pool], folds, seed, None if groups is None else groups[pool])
        rows["train"], rows["test"] = pool[membership != fold], pool[membership == fold]
    if not len(rows["val"]) and val_fraction > 0:
        pool = rows["train"]
        train, val = carve_validation(labels[pool], val_fraction, seed, None if groups is None else groups[pool])
        rows["train"], rows["val"] = pool[train], pool[val]
    if calibration_fraction > 0:
        pool = rows["train"]
        train, held_out = carve_validation(labels[pool], calibration_fraction, seed,
                                           None if groups is None else groups[pool], key="data.calibration_fraction")
        rows["train"], rows["calibration"] = pool[train], pool[held_out]
    return {split: split_rows for split, split_rows in rows.items() if len(split_rows)}


def count_table(class_names: list[str], labels: dict[str, np.ndarray]) -> str:
    """Per-split, per-class image counts as an aligned text table (logged before training)."""
    header = ["split", *class_names, "total"]
    rows = [header]
    for split, split_labels in labels.items():
        counts = np.bincount(split_labels, minlength=len(class_names))
        rows.append([split, *map(str, counts), str(len(split_labels))])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) if column else cell.ljust(width)
                               for column, (cell, width) in enumerate(zip(row, widths))) for row in rows)
