"""Which image goes to train, val and test: validation is carved from train exactly as scikit-learn's stratified
`train_test_split` (seed 42 by default, as the reference notebooks), optionally after merging train and val."""

from __future__ import annotations

import numpy as np

from jaxmed.errors import JaxmedError

SPLITS = ("train", "val", "test")


def carve_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val) into `labels`, in scikit-learn's order: the same call the reference makes."""
    from sklearn.model_selection import train_test_split  # 2 s to import: only when a cache is built

    try:
        return train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as error:
        raise JaxmedError(f"cannot carve a stratified validation split (data.val_fraction={fraction}) from "
                          f"{len(labels)} training images: {error}") from None


def plan(origin: np.ndarray, labels: np.ndarray, usable: np.ndarray, *, val_fraction: float, seed: int,
         merge_train_val: bool) -> dict[str, np.ndarray]:
    """Rows of each split, as indices into the source's items; `origin` names each item's source split.

    The source's own val split is kept unless merge_train_val (the Kermany protocol: its val has 16 images);
    without a val split, val_fraction of train is carved off (none if val_fraction is 0).
    """
    rows = {split: np.flatnonzero((origin == split) & usable) for split in SPLITS}
    if merge_train_val and len(rows["val"]):
        rows["train"], rows["val"] = np.concatenate([rows["train"], rows["val"]]), rows["val"][:0]
    if not len(rows["val"]) and val_fraction > 0:
        train, val = carve_validation(labels[rows["train"]], val_fraction, seed)
        rows["train"], rows["val"] = rows["train"][train], rows["train"][val]
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
