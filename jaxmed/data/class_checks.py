"""Before the first step: the classes each split has images of, so that data a classifier cannot learn from (one
class, a test class never seen in training) is an error now, not a crash in evaluation after training."""

from __future__ import annotations

import logging

import numpy as np

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.data")


def check_classes(dataset, where: str = "the data") -> None:
    """JaxmedError for fewer than two trained classes or a class with no training images (naming the splits that do
    have it: a test class never trained); warns, naming them, of classes a val/test split has no images of."""
    names = dataset.class_names
    present = {split: set(np.unique(np.asarray(dataset.splits[split].labels)).tolist()) for split in dataset.splits}
    trained = present.get("train", set())
    if len(trained) < 2:
        shown = ", ".join(names[i] for i in sorted(trained)) or "none"
        raise JaxmedError(f"train has images of {len(trained)} class(es) ({shown}) in {where}: a classifier needs "
                          "at least two — add a folder of images per class under the train folder")
    missing = [i for i in range(len(names)) if i not in trained]
    if missing:
        having = {names[i]: [split for split in present if i in present[split]] for i in missing}
        shown = ", ".join(f"{name} (images in {', '.join(splits)})" if splits else name
                          for name, splits in having.items())
        raise JaxmedError(f"train has no images of class(es) {shown} in {where}: the model cannot learn them — add "
                          "their images to train or remove the class")
    for split, labels in present.items():
        absent = [names[i] for i in range(len(names)) if i not in labels]
        if absent and split != "train":
            log.warning("%s has no images of class(es) %s in %s: their recall on %s cannot be measured", split,
                        ", ".join(absent), where, split)
