"""Out-of-distribution flags end to end: the demo config trained briefly, evaluated (W/ood, the report's `ood`
section, eval/test/predictions.csv's columns), then `python -m jaxmed.predict` on phantoms the run has not seen
plus non-MRI images this test makes — from the run and from its export, with the same scores and flags — and a run
evaluated before OOD detection existed, which predicts as before with empty columns and a note."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_configs import config_file
from helpers_ood import NON_MRI_KINDS, write_mixed_folder
from jaxmed import experiment, export, predict


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ood")
    config = config_file("configs/demo.py")
    config.data.cache_dir = str(base / "cache")
    config.data.synthetic.train_per_class = 100
    config.data.synthetic.test_per_class = 10
    config.train.epochs, config.train.min_steps, config.train.eval_every_steps = 5, 0, 25
    config.train.async_checkpoints = False
    config.eval.bootstrap, config.eval.explain_per_class, config.eval.grid_images = 0, 0, 4
    workdir = base / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    result = experiment.train_and_evaluate(config, workdir)
    files = write_mixed_folder(base / "mixed", per_kind=12)
    return workdir, base / "mixed", files, result["test"]


def _rows(path):
    return list(csv.DictReader(Path(path).open()))


def test_evaluation_fits_stores_and_reports_ood(demo_run):
    workdir, _, _, report = demo_run
    section = report["ood"]
    assert section["method"] == "vim" and section["method_chosen_by"] == "default for resnet"
    stored = json.loads((workdir / "ood/ood.json").read_text())
    assert stored["checkpoint"] == report["checkpoint"] and stored["thresholds"]["vim"] == section["threshold"]
    rate = section["flag_rate"]
    assert rate["num_examples"] == 40 and rate["ci95"][0] <= rate["rate"] <= rate["ci95"][1]
    print("self-check AUROC:", section["self_check"]["auroc"])
    for name in ("mahalanobis", "vim", "knn"):
        assert section["self_check"]["auroc"][name] > 0.9, name
    rows = _rows(workdir / "eval/test/predictions.csv")
    flags = [row["out_of_distribution"] for row in rows]
    assert set(flags) <= {"true", "false"} and flags.count("true") == rate["flagged"]
    page = (workdir / "eval/test/report.html").read_text()
    assert "Out-of-distribution detection" in page and 'data-key="ood.self_check.auroc.vim"' in page
    assert "Out-of-distribution detection: vim" in (workdir / "eval/test/report.md").read_text()


def test_predict_flags_non_mri_images_and_export_agrees(demo_run, tmp_path, caplog):
    workdir, folder, files, _ = demo_run
    hf_dir = export.export(workdir, tmp_path / "hf")
    assert (hf_dir / "ood/ood.json").exists()
    with caplog.at_level(logging.WARNING, logger="jaxmed.predict"):
        assert predict.main(["--workdir", str(workdir), str(folder), "--out", str(tmp_path / "run")]) == 0
    warnings = [record.getMessage() for record in caplog.records if "is this the right model" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert predict.main(["--model", str(hf_dir), str(folder), "--out", str(tmp_path / "model")]) == 0
    ours, theirs = _rows(tmp_path / "run/predictions.csv"), _rows(tmp_path / "model/predictions.csv")
    assert [row["out_of_distribution"] for row in ours] == [row["out_of_distribution"] for row in theirs]
    np.testing.assert_allclose([float(row["ood_score"]) for row in theirs], [float(row["ood_score"]) for row in ours],
                               rtol=1e-6, atol=1e-6)
    kind_of = {str(path): kind for kind, paths in files.items() for path in paths}
    rates = {kind: np.mean([row["out_of_distribution"] == "true" for row in ours if kind_of[row["path"]] == kind])
             for kind in files}
    print("flag rate per kind:", rates)
    non_mri = np.mean([row["out_of_distribution"] == "true" for row in ours if kind_of[row["path"]] in NON_MRI_KINDS])
    assert non_mri >= 0.9, rates
    assert rates["phantoms"] <= 0.25, rates  # ~5% expected (ood_keep 0.95); 12 images
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["out_of_distribution"] == sum(row["out_of_distribution"] == "true" for row in ours)
    assert "is this the right model?" in summary["warning"]


def test_a_run_evaluated_before_ood_detection_predicts_with_empty_columns(demo_run, tmp_path, capsys):
    workdir, folder, files, _ = demo_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("ood", "eval"))
    assert predict.main(["--workdir", str(old), str(folder / "phantoms"), "--out", str(tmp_path / "out")]) == 0
    rows = _rows(tmp_path / "out/predictions.csv")
    assert len(rows) == len(files["phantoms"]) and {(row["ood_score"], row["out_of_distribution"]) for row in rows} \
        == {("", "")}
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["out_of_distribution"] is None
    assert [note for note in summary["notes"] if "no OOD detectors" in note]
    assert "Traceback" not in capsys.readouterr().err


def test_detectors_of_another_checkpoint_are_neither_applied_nor_exported(demo_run, tmp_path, caplog):
    workdir, folder, _, _ = demo_run
    fitted_for = json.loads((workdir / "ood/ood.json").read_text())["checkpoint"]
    with caplog.at_level(logging.WARNING):
        hf_dir = export.export(workdir, tmp_path / "hf", which="latest")
        assert predict.main(["--workdir", str(workdir), "--checkpoint", "latest", str(folder / "phantoms"), "--out",
                             str(tmp_path / "out")]) == 0
    assert not (hf_dir / "ood").exists()
    assert any(f"ood is for {fitted_for}, not the exported checkpoints/" in record.getMessage()
               for record in caplog.records)
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["out_of_distribution"] is None
    assert any(note.startswith(f"ood/ is for {fitted_for}, not checkpoints/") for note in summary["notes"])
    assert {row["out_of_distribution"] for row in _rows(tmp_path / "out/predictions.csv")} == {""}
