"""What kind of directory a command was given, so that its errors give advice that works: a cross-validation parent
(`train.folds`: its runs are W/fold_<k>) and the splits a run's data has (W/splits.csv)."""

from __future__ import annotations

import csv

from jaxmed.errors import JaxmedError


def fold_runs(workdir) -> list:
    """W/fold_<k> run directories of a cross-validation parent, in fold order ([] for an ordinary run)."""
    folds = [p for p in workdir.glob("fold_*") if p.name.removeprefix("fold_").isdigit()] if workdir.exists() else []
    return sorted(folds, key=lambda p: int(p.name.removeprefix("fold_")))


def saved_steps(workdir) -> list[int]:
    """Steps saved in W/checkpoints and W/best (orbax's unfinished saves have other names)."""
    return sorted({int(p.name) for sub in ("checkpoints", "best") if (workdir / sub).exists()
                   for p in (workdir / sub).iterdir() if p.name.isdigit()})


def check_not_cv_parent(workdir) -> None:
    """A cross-validation parent holds no checkpoint of its own: name its fold runs instead."""
    folds = fold_runs(workdir)
    if folds and not saved_steps(workdir):
        raise JaxmedError(f"{workdir} is a cross-validation parent (train.folds={len(folds)}), not one run: "
                          f"pass its fold runs instead, {', '.join(str(p) for p in folds)}; the pooled "
                          f"results are in {workdir}/cv/summary.html")


def data_splits(workdir) -> list[str]:
    """The splits W/splits.csv lists (what the run's data had when it trained); [] without the file."""
    path = workdir / "splits.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return sorted({row["split"] for row in csv.DictReader(handle)})


def evaluate_advice(workdir, split: str) -> str:
    """How to get W/eval/<split>/, or why it cannot be had."""
    splits = data_splits(workdir)
    if splits and split not in splits:
        others = [s for s in splits if s != "train"]
        instead = f"; use --split {others[0]}" if others else ""
        return f"its data has no {split} split (W/splits.csv has {', '.join(splits)}){instead}"
    return f"python -m jaxmed.evaluate --workdir {workdir} --split {split} makes them"


def check_trained(workdir) -> None:
    """Before anything opens W's checkpoints (and starts orbax's threads): there are some to read."""
    check_not_cv_parent(workdir)
    if not saved_steps(workdir):
        raise JaxmedError(f"no checkpoints in {workdir}: pass the --workdir a jaxmed.main run trained into (one that "
                          "has saved at least one step)")
