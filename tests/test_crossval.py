"""train.folds=K: K ordinary runs on stratified folds of train+val, each image held out exactly once, W/cv/ with
per-fold and pooled out-of-fold numbers; a fold stopped by SIGTERM resumes, finished folds are not retrained."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from helpers_configs import config_file
from jaxmed import crossval
from jaxmed.train import loop


def _config(tmp_path, folds=3):
    config = config_file("tests/tiny_config.py")
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.async_checkpoints = False
    config.eval.bootstrap = 100
    config.eval.explain_per_class = 0
    config.train.folds = folds
    return config


class _StopAtStep:
    """SIGTERM's effect, deterministically: the loop sees a preemption request after `after` steps. Here that is
    step 4, inside a fold's first epoch (34 training images at batch 8: 5 steps, the last partial): saved then."""

    def __init__(self, after: int):
        self.after, self.checks = after, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self):
        self.checks += 1
        return self.checks > self.after


def test_three_folds_hold_each_image_out_once_and_an_interrupted_fold_resumes(tmp_path, monkeypatch, caplog):
    config = _config(tmp_path)
    workdir = tmp_path / "cv"
    with monkeypatch.context() as patch:
        calls = []
        real_train = loop.train

        def stop_in_fold_one(folded, fold_dir, run=None):
            calls.append(Path(fold_dir).name)
            if Path(fold_dir).name == "fold_1":
                patch.setattr(loop, "_Preemption", _StopAtStep(3))
            return real_train(folded, fold_dir, run)

        patch.setattr("jaxmed.train.train", stop_in_fold_one)
        result = crossval.cross_validate(config, workdir)
    assert result == {"preempted_at": 4, "fold": 1} and calls == ["fold_0", "fold_1"]
    finished = (workdir / "fold_0/eval/test/report.json").stat().st_mtime_ns
    assert not (workdir / "fold_1/eval").exists()

    with caplog.at_level("INFO"):
        result = crossval.cross_validate(config, workdir)
    messages = [record.getMessage() for record in caplog.records]
    assert any("fold 1 of 3: finished earlier" in message for message in messages)
    assert any("resuming from step 4" in message for message in messages)
    assert (workdir / "fold_0/eval/test/report.json").stat().st_mtime_ns == finished  # not retrained
    assert result["folds"] == 3

    # every image of train+val is held out by exactly one fold; the real test split is not used
    held_out = []
    for fold in range(3):
        with open(workdir / f"fold_{fold}/splits.csv") as handle:
            rows = list(csv.DictReader(handle))
        test_ids = {row["id"] for row in rows if row["split"] == "test"}
        train_ids = {row["id"] for row in rows if row["split"] in ("train", "val")}
        assert test_ids and not test_ids & train_ids
        held_out += sorted(test_ids)
    assert len(held_out) == len(set(held_out)) == 64  # 4 classes × 16 training phantoms
    assert not any("/test/" in image_id for image_id in held_out)

    summary = json.loads((workdir / "cv/summary.json").read_text())
    assert summary["folds"] == 3 and sum(summary["images_per_fold"]) == 64
    reports = [json.loads((workdir / f"fold_{fold}/eval/test/report.json").read_text()) for fold in range(3)]
    accuracy = summary["metrics"]["accuracy"]
    assert accuracy["values"] == [fold_report["accuracy"] for fold_report in reports]
    assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
    assert accuracy["sd"] == pytest.approx(np.std(accuracy["values"], ddof=1))
    pooled = summary["pooled"]
    assert pooled["num_examples"] == 64
    correct = sum(round(fold_report["accuracy"] * fold_report["num_examples"]) for fold_report in reports)
    assert pooled["accuracy"] == pytest.approx(correct / 64)
    for name in ("summary.md", "confusion_matrix.png", "roc_curves.png", "reliability_diagram.png"):
        assert (workdir / "cv" / name).stat().st_size > 0, name
    assert "| accuracy |" in (workdir / "cv/summary.md").read_text()


def test_one_fold_is_refused(tmp_path):
    from jaxmed.errors import JaxmedError

    with pytest.raises(JaxmedError, match="at least 2 folds"):
        crossval.cross_validate(_config(tmp_path, folds=1), tmp_path / "cv")
