"""`python -m jaxmed.evaluate` and `python -m jaxmed.export` on a trained run: every file, the operating point,
checkpoint selection, and the exported directory opened by transformers alone."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from helpers_configs import train_tiny_run
from jaxmed import evaluate, export, train
from jaxmed.train.checkpoint import Checkpoints
from jaxmed.config import load_run_config
from jaxmed.errors import JaxmedError

FIGURES = ("confusion_matrix.png", "roc_curves.png", "pr_curves.png", "training_curves.png", "predictions_grid.png",
           "attention_rollout.png", "gradcam_predicted_class.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The tiny ViT trained 8 steps (validated at 4 and 8), with an operating point for `meningioma`."""
    return train_tiny_run(tmp_path_factory.mktemp("run"))


def test_end_of_training_writes_the_full_evaluation(run_dir):
    out = run_dir / "eval/test"
    report = json.loads((out / "report.json").read_text())
    assert report["num_examples"] == 16 and report["checkpoint"].startswith("best/")
    for key in ("accuracy", "balanced_accuracy", "cohen_kappa", "per_class", "macro", "weighted", "confusion_matrix",
                "roc_auc", "ci95"):
        assert key in report, key
    assert set(report["per_class"]) == {"glioma", "meningioma", "no_tumor", "pituitary"}
    low, high = report["ci95"]["accuracy"]
    assert low <= report["accuracy"] <= high
    assert report["ci95_methods"]["accuracy"] == {"method": "Wilson score", "unit": "image", "note": None}
    assert report["ci95_methods"]["cohen_kappa"]["unit"] == "image"
    assert "95% intervals:" in (out / "report.md").read_text()
    point = report["operating_point"]
    assert point["positive_class"] == "meningioma" and point["chosen_on"] == "val"
    assert point["val"]["sensitivity"] >= 0.9  # reached on val, where it was chosen
    assert "test" in point and 0 <= point["test"]["sensitivity"] <= 1
    assert "Operating point for meningioma" in (out / "report.md").read_text()
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_predictions_csv_has_every_image_once_with_its_probabilities(run_dir):
    rows = list(csv.DictReader((run_dir / "eval/test/predictions.csv").open()))
    assert len(rows) == 16 and len({row["id"] for row in rows}) == 16
    names = ["glioma", "meningioma", "no_tumor", "pituitary"]
    for row in rows:
        probabilities = np.array([float(row[f"p_{n}"]) for n in names])
        logits = np.array([float(row[f"logit_{n}"]) for n in names])
        assert abs(probabilities.sum() - 1) < 1e-4
        assert logits.argmax() == probabilities.argmax()
        assert row["prediction"] == names[int(probabilities.argmax())]
    report = json.loads((run_dir / "eval/test/report.json").read_text())
    accuracy = np.mean([row["label"] == row["prediction"] for row in rows])
    assert accuracy == pytest.approx(report["accuracy"])


def test_cli_evaluates_val_with_a_chosen_checkpoint(run_dir, capsys):
    assert evaluate.main(["--workdir", str(run_dir), "--split", "val", "--checkpoint", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"] == "val" and summary["checkpoint"] == "best/4"
    report = json.loads((run_dir / "eval/val/report.json").read_text())
    assert report["num_examples"] == 13  # the stratified 20% of 4 × 16 train images
    assert evaluate.main(["--workdir", str(run_dir), "--split", "val", "--checkpoint", "latest"]) == 0
    assert json.loads((run_dir / "eval/val/report.json").read_text())["checkpoint"] == "checkpoints/8"


def test_cli_refuses_bad_requests(run_dir, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(run_dir), "--checkpoint", "3"]) == 2
    assert "no checkpoint '3'" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(run_dir), "--split", "holdout"]) == 2
    assert "no 'holdout' split" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_export_opens_in_transformers_with_the_same_logits_and_is_byte_stable(run_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert export.main(["--workdir", str(run_dir), "--out", str(first)]) == 0
    export.export(run_dir, second)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    torch_model = AutoModelForImageClassification.from_pretrained(first).eval()
    assert torch_model.config.id2label == {0: "glioma", 1: "meningioma", 2: "no_tumor", 3: "pituitary"}
    model, source = export.load_trained(run_dir)
    assert source.startswith("best/")
    split = _test_split(run_dir)
    pixels = np.asarray(_normalize(run_dir, split.images))
    ours = np.asarray(model(pixels))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    # and the trainer's own evaluation predicted exactly these probabilities, at the temperature fitted on val
    rows = list(csv.DictReader((run_dir / "eval/test/predictions.csv").open()))
    names = torch_model.config.id2label
    recorded = np.array([[float(row[f"p_{names[i]}"]) for i in range(4)] for row in rows])
    temperature = json.loads((run_dir / "calibration.json").read_text())["temperature"]
    assert temperature != 1.0
    np.testing.assert_allclose(recorded, torch.softmax(torch.from_numpy(theirs) / temperature, -1).numpy(), atol=1e-4)


def test_calibration_is_fitted_on_val_reported_before_and_after_and_stored(run_dir):
    report = json.loads((run_dir / "eval/test/report.json").read_text())
    calibrated = report["calibration"]
    assert calibrated["fitted_on"] == "val" and calibrated["applied"]
    stored = json.loads((run_dir / "calibration.json").read_text())
    assert stored["temperature"] == calibrated["temperature"] and stored["checkpoint"] == report["checkpoint"]
    for when in ("before", "after"):
        assert set(calibrated[when]) >= {"ece_15", "ece_adaptive_15", "mce", "brier", "nll", "bins"}
    # the temperature minimises the val NLL, not the test one: on test NLL need not fall, but it is the same model
    assert calibrated["before"]["num_examples"] == calibrated["after"]["num_examples"] == report["num_examples"]
    assert (run_dir / "eval/test/reliability_diagram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Calibration: temperature T = " in (run_dir / "eval/test/report.md").read_text()
    point = json.loads((run_dir / "operating_point.json").read_text())
    assert point["positive_class"] == "meningioma" and point["threshold"] == report["operating_point"]["threshold"]


def test_without_calibration_probabilities_are_the_plain_softmax(run_dir, tmp_path):
    """eval.calibrate=False: T = 1, and the recorded probabilities are softmax(logits) unchanged."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    config = load_run_config(copy)
    config.eval.calibrate = False
    run = train.setup(config, copy)
    checkpoints = Checkpoints.for_run(copy, config.train)
    try:
        report = evaluate.evaluate_run(run, checkpoints, train.make_eval_step(run), "val")
    finally:
        checkpoints.close()
    assert report["calibration"]["temperature"] == 1.0 and not report["calibration"]["applied"]
    assert report["calibration"]["before"] == report["calibration"]["after"]
    assert json.loads((copy / "calibration.json").read_text())["temperature"] == 1.0


def test_checkpoint_selection_lists_what_exists(run_dir):
    checkpoints = Checkpoints(run_dir, async_saves=False)
    try:
        assert checkpoints.select("best")[2].startswith("best/")
        assert checkpoints.select("latest")[1:] == (8, "checkpoints/8")
        with pytest.raises(JaxmedError, match="best steps"):
            checkpoints.select("999")
    finally:
        checkpoints.close()


def _test_split(run_dir):
    config = load_run_config(run_dir)
    from jaxmed import data as jdata

    spec = train.model_spec(config)
    return jdata.load_dataset(config.data, jdata.Preprocessor.from_config(spec.preprocessor)).splits["test"]


def _normalize(run_dir, images):
    from jaxmed import data as jdata

    spec = train.model_spec(load_run_config(run_dir))
    return jdata.model_inputs(np.asarray(images), jdata.Preprocessor.from_config(spec.preprocessor))
