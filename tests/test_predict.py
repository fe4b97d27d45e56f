"""`python -m jaxmed.predict` on files: the same probabilities as jaxmed.evaluate on the same images, from the run
and from its export; unreadable inputs listed, not fatal (unless --strict); calibration, operating point, heatmaps
and the command line's refusals."""

import csv
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from scipy.special import softmax

from helpers_configs import config_file
from jaxmed import experiment, export, predict
from jaxmed.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
NAMES = synthetic.CLASS_NAMES


def _write_dataset(root: Path) -> None:
    """Phantoms as real files: PNG and JPEG, gray and tinted RGB, sizes that differ from the 32×32 model input."""
    for split, per_class in (("train", 10), ("test", 3)):
        images, labels, _ = synthetic.generate(split, per_class, 40, seed=5)
        for index, (image, label) in enumerate(zip(images, labels)):
            picture = Image.fromarray(image).resize((40 + 4 * (index % 3), 36 + 6 * (index % 2)))
            if index % 2:
                tints = [picture.point(lambda value, scale=scale: value * scale) for scale in (1.0, 0.8, 0.6)]
                picture = Image.merge("RGB", tints)
            folder = root / split / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"{split}{index:03d}.{'jpg' if index % 3 == 0 else 'png'}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, test folder, evaluate's in-memory {id: probabilities} of the test split). Evaluation also writes
    W/calibration.json for the best checkpoint (T = 1 here), which predict reads."""
    base = tmp_path_factory.mktemp("predict")
    _write_dataset(base / "data")
    config = config_file("tests/tiny_config.py")
    config.data.format, config.data.root, config.data.cache_dir = "imagefolder", str(base / "data"), str(base / "cache")
    config.train.async_checkpoints = False
    config.eval.bootstrap, config.eval.explain_per_class = 0, 0
    # T = 1 stored with the run, so --model (an HF directory carries no temperature) must give the same numbers;
    # fitted temperatures are applied in test_calibration_and_operating_point_files_are_applied
    config.eval.calibrate = False
    # a held-out calibration split (~13 images) for the conformal sets: one threshold for all (Mondrian needs more
    # images per class than this tiny set has), alpha 0.2 so that sets are not every class
    config.data.calibration_fraction = 0.4
    config.eval.conformal_mondrian, config.eval.conformal_alpha = False, 0.2
    workdir = base / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    report = importlib.import_module("jaxmed.evaluate.report")
    recorded = {}
    original = report.write_predictions

    def recording(path, ids, labels, probabilities, class_names, **columns):  # full-precision values behind the CSV
        recorded[Path(path).parent.name] = dict(zip(ids, np.asarray(probabilities)))
        original(path, ids, labels, probabilities, class_names, **columns)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_predictions", recording)
        experiment.train_and_evaluate(config, workdir)
    return workdir, base / "data/test", recorded["test"]


@pytest.fixture(scope="module")
def from_workdir(trained):
    workdir, test_folder, _ = trained
    files, skipped, _ = predict.collect_inputs([str(test_folder)])
    return predict.predict_files(predict.load_predictor(workdir=workdir), files, skipped=skipped)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export.export(trained[0], tmp_path_factory.mktemp("exported") / "model")


def _rows(path):
    return list(csv.DictReader(Path(path).open()))


def _one_error_line(capsys, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_predictions_equal_evaluate_on_the_same_files(trained, from_workdir, tmp_path):
    workdir, test_folder, evaluated = trained
    assert from_workdir.paths == list(evaluated)  # every test file, in the imagefolder order
    expected = np.stack(list(evaluated.values()))
    difference = np.max(np.abs(from_workdir.probabilities - expected))
    print(f"max |Δp| predict vs evaluate: {difference:.3g}")
    assert difference <= 1e-6
    # the command line writes the same rows, formatted as evaluate's predictions.csv
    assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(tmp_path)]) == 0
    ours, theirs = _rows(tmp_path / "predictions.csv"), _rows(workdir / "eval/test/predictions.csv")
    assert [row["path"] for row in ours] == [row["id"] for row in theirs]
    for mine, reference in zip(ours, theirs):
        assert mine["prediction"] == reference["prediction"]
        # both at full precision now, so equal up to the |Δp| ≤ 1e-6 of the two compiled predict paths
        assert [float(mine[f"p_{name}"]) for name in NAMES] == pytest.approx(
            [float(reference[f"p_{name}"]) for name in NAMES], abs=1e-6)
    temperature = json.loads((workdir / "calibration.json").read_text())["temperature"]  # fitted on val
    assert "flagged" not in ours[0] and float(ours[0]["temperature"]) == pytest.approx(temperature, rel=1e-5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["predicted"] == 12 and summary["skipped"] == 0 and summary["temperature"] == temperature
    assert summary["class_names"] == NAMES and "best/" in summary["checkpoint"]


def test_unreadable_inputs_are_listed_and_strict_refuses_them(trained, tmp_path, capsys):
    workdir, test_folder, _ = trained
    folder = tmp_path / "mixed"
    (folder / "nested").mkdir(parents=True)
    gray = sorted(test_folder.rglob("*.png"))[0]
    shutil.copy(gray, folder / "a.png")
    jpeg = sorted(test_folder.rglob("*.jpg"))[0]
    shutil.copy(jpeg, folder / "nested/b.jpg")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "c.dcm")
    shutil.copy(get_testdata_file("rtplan.dcm"), folder / "plan.dcm")  # DICOM without pixel data
    data = jpeg.read_bytes()
    (folder / "broken.jpg").write_bytes(data[:len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")  # ignored inside a folder, counted
    (folder / ".DS_Store").write_bytes(b"\0junk")
    text = tmp_path / "readme.txt"
    text.write_text("named explicitly, so reported\n")
    out = tmp_path / "out"
    argv = ["--workdir", str(workdir), str(folder), str(text), str(tmp_path / "missing.png"), "--out", str(out),
            "--batch-size", "3", "--checkpoint", "latest"]  # 8 devices do not divide 3: the one-device path
    assert predict.main(argv) == 0
    assert [row["path"] for row in _rows(out / "predictions.csv")] == [
        str(folder / name) for name in ("a.png", "c.dcm", "nested/b.jpg")]
    reasons = {Path(row["path"]).name: row["reason"] for row in _rows(out / "skipped.csv")}
    assert set(reasons) == {"broken.jpg", "empty.png", "plan.dcm", "readme.txt", "missing.png"}
    assert "truncated" in reasons["broken.jpg"] and "empty file" in reasons["empty.png"]
    assert "no pixel data" in reasons["plan.dcm"] and "not an image format" in reasons["readme.txt"]
    assert reasons["missing.png"] == "no such file or directory"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["predicted"], summary["skipped"], summary["ignored_non_images"]) == (3, 5, 1)
    # evaluation fitted its temperature for the best checkpoint, not for the latest one asked for here
    assert summary["temperature"] == 1.0 and "calibration.json is for best/" in summary["notes"][0]

    assert predict.main(["--strict", "--workdir", str(workdir), str(folder), "--out", str(tmp_path / "s")]) == 2
    _one_error_line(capsys, "--strict", "broken.jpg")
    assert not (tmp_path / "s").exists()


def test_exported_model_predicts_the_same(exported, from_workdir, tmp_path):
    files, _, _ = predict.collect_inputs(from_workdir.paths)
    result = predict.predict_files(predict.load_predictor(model_dir=exported), files)
    difference = np.max(np.abs(result.probabilities - from_workdir.probabilities))
    print(f"max |Δp| --model vs --workdir: {difference:.3g}")
    assert result.paths == from_workdir.paths and difference <= 1e-6


def test_calibration_and_operating_point_files_are_applied(trained, from_workdir, tmp_path, capsys):
    workdir, test_folder, _ = trained
    files, _, _ = predict.collect_inputs([str(test_folder)])
    calibration, point = workdir / "calibration.json", workdir / "operating_point.json"
    evaluations = calibration.read_text()
    try:
        calibration.write_text(json.dumps({"temperature": 1.0}))
        same = predict.predict_files(predict.load_predictor(workdir=workdir), files)
        np.testing.assert_array_equal(same.logits, from_workdir.logits)
        np.testing.assert_array_equal(same.probabilities, softmax(from_workdir.logits.astype(np.float64), axis=-1))

        calibration.write_text(json.dumps({"temperature": 2.5}))
        expected = softmax(from_workdir.logits.astype(np.float64) / 2.5, axis=-1)
        threshold = float(np.median(expected[:, 1]))
        point.write_text(json.dumps({"positive_class": NAMES[1], "threshold": threshold}))
        flagged = expected[:, 1] >= threshold
        assert 0 < flagged.sum() < len(files)
        out = tmp_path / "out"
        assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(out), "--explain", "2"]) == 0
        rows = _rows(out / "predictions.csv")
        written = np.array([[float(row[f"p_{name}"]) for name in NAMES] for row in rows])
        assert np.max(np.abs(written - expected)) <= 1e-6  # "%.6g" rounds by at most 5e-7 below 1
        assert [row["flagged"] == "True" for row in rows] == flagged.tolist()
        assert {row["temperature"] for row in rows} == {"2.5"}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["temperature"] == 2.5 and "calibration.json" in summary["probabilities"]
        assert summary["flagged"] == int(flagged.sum()) and summary["explained"] == 2
        pictures = sorted((out / "explain").iterdir())
        assert len(pictures) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
        assert "attention_rollout" in pictures[0].name  # the tiny model is a ViT

        calibration.write_text(json.dumps({"temperature": -1}))
        assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(out)]) == 2
        _one_error_line(capsys, "temperature must be a positive number")
    finally:
        calibration.write_text(evaluations)
        point.unlink(missing_ok=True)


def test_export_carries_temperature_operating_point_and_input_handling(trained, tmp_path, capsys):
    """A colleague with only the exported directory gets the run's calibrated probabilities and flags."""
    workdir, test_folder, _ = trained
    files, _, _ = predict.collect_inputs([str(test_folder)])
    calibration, point = workdir / "calibration.json", workdir / "operating_point.json"
    evaluations = calibration.read_text()
    best = json.loads(evaluations)["checkpoint"]
    assert best.startswith("best/")
    try:
        calibration.write_text(json.dumps({"temperature": 2.5, "checkpoint": best}))
        run = predict.predict_files(predict.load_predictor(workdir=workdir), files)
        threshold = float(np.median(run.probabilities[:, 1]))
        point.write_text(json.dumps({"positive_class": NAMES[1], "threshold": threshold, "checkpoint": best}))
        run = predict.predict_files(predict.load_predictor(workdir=workdir), files)
        assert 0 < run.flagged.sum() < len(files)
        out = export.export(workdir, tmp_path / "model")
        assert json.loads((out / "calibration.json").read_text())["temperature"] == 2.5
        assert json.loads((out / "operating_point.json").read_text())["threshold"] == threshold
        handling = json.loads((out / "jaxmed_input.json").read_text())
        assert handling["grayscale"] is True and handling["dicom_frame"] == -1 and best in handling["exported_from"]
        assert (handling["volume_axis"], handling["volume_slices"], handling["volume_frame"]) == ("axial", "middle", 0)
        loaded = predict.load_predictor(model_dir=out)
        assert (loaded.temperature, loaded.grayscale, loaded.calibrated) == (2.5, True, True)
        colleague = predict.predict_files(loaded, files)
        difference = np.max(np.abs(colleague.probabilities - run.probabilities))
        print(f"max |Δp| exported (T = 2.5) vs run: {difference:.3g}")
        assert difference <= 1e-6 and colleague.flagged.tolist() == run.flagged.tolist()
        assert predict.main(["--model", str(out), "--color", str(test_folder), "--out", str(tmp_path / "o")]) == 2
        _one_error_line(capsys, "--color", "trained on grayscale images")

        # another checkpoint's temperature and threshold do not travel; a stale copy in the same DIR is removed
        out = export.export(workdir, tmp_path / "model", "latest")
        assert not (out / "calibration.json").exists() and not (out / "operating_point.json").exists()
        assert predict.load_predictor(model_dir=out).temperature == 1.0
    finally:
        calibration.write_text(evaluations)
        point.unlink(missing_ok=True)


def test_bad_usage_is_one_line_and_exit_2(trained, exported, tmp_path, capsys):
    workdir, test_folder, _ = trained
    out = ["--out", str(tmp_path / "out")]
    assert predict.main([str(test_folder), *out]) == 2
    _one_error_line(capsys, "exactly one of --workdir")
    assert predict.main(["--workdir", str(workdir), "--model", str(exported), str(test_folder), *out]) == 2
    _one_error_line(capsys, "exactly one of --workdir")
    assert predict.main(["--workdir", str(tmp_path), str(test_folder), *out]) == 2
    _one_error_line(capsys, "no config.json")
    assert predict.main(["--model", str(tmp_path / "nowhere"), str(test_folder), *out]) == 2
    _one_error_line(capsys, "no such directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("x")
    assert predict.main(["--workdir", str(workdir), str(tmp_path / "empty"), *out]) == 2
    _one_error_line(capsys, "no images found", "1 non-image files ignored")
    assert predict.main(["--workdir", str(workdir), *out]) == 2
    _one_error_line(capsys, "no INPUT")
    assert predict.main(["--model", str(exported), "--checkpoint", "latest", str(test_folder), *out]) == 2
    _one_error_line(capsys, "--checkpoint is for --workdir")
    assert predict.main(["--workdir", str(workdir), "--color", str(test_folder), *out]) == 2
    _one_error_line(capsys, "--color is for --model")
    assert predict.main(["--workdir", str(workdir), str(test_folder), "--explain", "x", *out]) == 2
    _one_error_line(capsys, "invalid int value")
    assert not (tmp_path / "out").exists()


def test_module_entry_point_runs(exported, trained, tmp_path):
    image = sorted(trained[1].rglob("*.png"))[0]
    completed = subprocess.run([sys.executable, "-m", "jaxmed.predict", "--model", str(exported), str(image),
                                "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["predicted"] == 1 and summary["model"] == str(exported)
    assert len(_rows(tmp_path / "predictions.csv")) == 1


def test_conformal_sets_in_evaluation_predict_and_export(trained, tmp_path):
    """eval/test gets the report section, the set-size figure and the prediction_set column; predict --workdir gives
    the same sets on the same files (u comes from the pixels), and the exported --model the same sets again."""
    workdir, test_folder, _ = trained
    section = json.loads((workdir / "eval/test/report.json").read_text())["conformal"]
    assert (section["method"], section["calibration_split"], section["approximate"]) == ("aps", "calibration", False)
    assert section["calibration_images"] >= 10 and "calibration" in (workdir / "splits.csv").read_text()
    evaluated = _rows(workdir / "eval/test/predictions.csv")
    covered = [row["label"] in row["prediction_set"].split("|") for row in evaluated]
    assert section["coverage"]["value"] == pytest.approx(np.mean(covered))
    assert section["mean_set_size"] == pytest.approx(np.mean([len(row["prediction_set"].split("|"))
                                                              if row["prediction_set"] else 0 for row in evaluated]))
    assert (workdir / "eval/test/conformal_set_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (workdir / "eval/test/report.html").read_text()
    assert "Conformal prediction sets" in page and 'data-key="conformal.coverage.value"' in page

    assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(tmp_path / "run")]) == 0
    from_run = [row["prediction_set"] for row in _rows(tmp_path / "run/predictions.csv")]
    assert from_run == [row["prediction_set"] for row in evaluated]
    assert len(set(from_run)) > 1  # sets of different sizes: not a degenerate comparison
    out = export.export(workdir, tmp_path / "model")
    assert json.loads((out / "conformal.json").read_text()) == json.loads((workdir / "conformal.json").read_text())
    assert predict.main(["--model", str(out), str(test_folder), "--out", str(tmp_path / "model_out")]) == 0
    assert [row["prediction_set"] for row in _rows(tmp_path / "model_out/predictions.csv")] == from_run
    summary = json.loads((tmp_path / "model_out/summary.json").read_text())
    assert summary["conformal"]["method"] == "aps" and "notes" not in summary
    # thresholds fitted for the best checkpoint do not travel with another one
    assert not (export.export(workdir, tmp_path / "latest", "latest") / "conformal.json").exists()


def test_a_run_evaluated_before_conformal_sets_predicts_with_an_empty_column(trained, tmp_path, capsys):
    workdir, test_folder, _ = trained
    stored = workdir / "conformal.json"
    fitted = stored.read_text()
    try:
        stored.unlink()
        assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(tmp_path / "old")]) == 0
        rows = _rows(tmp_path / "old/predictions.csv")
        assert len(rows) == 12 and {row["prediction_set"] for row in rows} == {""}
        summary = json.loads((tmp_path / "old/summary.json").read_text())
        assert "conformal" not in summary and len(summary["notes"]) == 1 and "no conformal.json" in summary["notes"][0]
        assert "Traceback" not in capsys.readouterr().err
        # thresholds fitted at another temperature are not applied to these probabilities
        stored.write_text(json.dumps(json.loads(fitted) | {"temperature": 3.0}))
        assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(tmp_path / "t")]) == 0
        assert {row["prediction_set"] for row in _rows(tmp_path / "t/predictions.csv")} == {""}
        stored.write_text(json.dumps({"method": "aps", "thresholds": [0.5]}))
        assert predict.main(["--workdir", str(workdir), str(test_folder), "--out", str(tmp_path / "bad")]) == 2
        _one_error_line(capsys, "conformal.json", "re-run")
    finally:
        stored.write_text(fitted)
