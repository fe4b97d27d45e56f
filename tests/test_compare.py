"""`python -m jaxmed.compare`: paired tests on synthetic predictions whose answers are known, one-line refusals of
runs that cannot be compared, and the real command line on two really trained tiny runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_configs import config_file
from jaxmed import compare, experiment
from jaxmed.config import base_config
from jaxmed.evaluate.report import write_predictions

ROOT = Path(__file__).resolve().parents[1]
TUMOURS = ["glioma", "meningioma", "no_tumor", "pituitary"]
BINARY = ["normal", "pneumonia"]


def _probabilities(predictions, num_classes, rng):
    """Random probabilities whose arg-max is exactly `predictions` (with some spread, so AUCs are not all 1)."""
    logits = rng.normal(size=(len(predictions), num_classes))
    rows = np.arange(len(predictions))
    logits[rows, predictions] = logits.max(1) + 0.1 + rng.random(len(predictions))
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(1, keepdims=True)


def _fake_run(root: Path, name: str, labels, probabilities, class_names, *, ids=None, split="test",
              order=None) -> Path:
    """A directory that looks like a finished run: config.json and eval/<split>/predictions.csv (rows in `order`)."""
    workdir = root / name
    (workdir / "eval" / split).mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(base_config().to_json_best_effort())
    ids = ids if ids is not None else [f"image_{i:03d}.png" for i in range(len(labels))]
    order = np.arange(len(labels)) if order is None else np.asarray(order)
    write_predictions(workdir / "eval" / split / "predictions.csv", [ids[i] for i in order], np.asarray(labels)[order],
                      np.asarray(probabilities)[order], class_names)
    return workdir


def _compare(capsys, *arguments):
    """(exit code, the JSON summary or None, stderr) of jaxmed.compare.main in this process."""
    code = compare.main([str(a) for a in arguments])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 and lines else None, captured.err


def _assert_intervals_hold_their_points(comparison):
    for run in comparison["runs"]:
        entries = [run["metrics"][key] for key in ("accuracy", "balanced_accuracy", "cohen_kappa", "f1_macro",
                                                   "roc_auc_macro")]
        for entry in entries + list(run["metrics"]["recall"].values()):
            if entry["value"] is not None:
                low, high = entry["ci95"]
                assert low <= entry["value"] + 1e-12 and entry["value"] <= high + 1e-12, (run["name"], entry)
    for pair in comparison["pairs"]:
        for key in ("accuracy", "balanced_accuracy", "roc_auc_macro"):
            entry = pair["paired_bootstrap"][key]
            low, high = entry["ci95"]
            assert low <= entry["difference"] + 1e-12 and entry["difference"] <= high + 1e-12, (key, entry)


def test_identical_runs_show_no_difference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 80)
    predictions = np.where(rng.random(80) < 0.7, labels, rng.integers(0, 4, 80))
    probabilities = _probabilities(predictions, 4, rng)
    a = _fake_run(tmp_path, "a", labels, probabilities, TUMOURS)
    b = _fake_run(tmp_path, "b", labels, probabilities, TUMOURS)
    code, summary, err = _compare(capsys, a, b, "--out", tmp_path / "out", "--bootstrap", 300)
    assert code == 0, err
    (pair,) = summary["pairs"]
    assert pair["mcnemar_p"] == 1.0
    assert pair["accuracy_difference"] == pair["balanced_accuracy_difference"] == pair["roc_auc_macro_difference"] == 0
    assert pair["accuracy_ci95"] == [0.0, 0.0]
    comparison = json.loads((tmp_path / "out/comparison.json").read_text())
    (pair,) = comparison["pairs"]
    assert pair["delong"] is None and "auc_verdict" not in pair  # DeLong is for two classes only
    assert "no evidence of a difference" in pair["verdict"]
    assert comparison["runs"][0]["metrics"] == comparison["runs"][1]["metrics"]
    # the point values are the run's own report's: metrics.classification_metrics on the same predictions
    assert comparison["runs"][0]["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(predictions == labels))
    _assert_intervals_hold_their_points(comparison)
    assert (tmp_path / "out/verdicts.txt").read_text().count("\n") == 1


def test_a_model_right_wherever_the_other_is_wrong_is_called_better(tmp_path, capsys):
    """Binary, 40 images: A is right on 34 where B is wrong, B right on the other 6 where A is wrong."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    a_right = np.ones(40, bool)
    a_right[rng.choice(40, 6, replace=False)] = False
    predictions_a, predictions_b = np.where(a_right, labels, 1 - labels), np.where(a_right, 1 - labels, labels)
    a = _fake_run(tmp_path, "strong", labels, _probabilities(predictions_a, 2, rng), BINARY)
    b = _fake_run(tmp_path, "weak", labels, _probabilities(predictions_b, 2, rng), BINARY)
    (b / "train_summary.json").write_text(json.dumps({"parameters": 1234567, "train_seconds": 95.5,
                                                      "images_per_second": 410.0}))
    code, summary, err = _compare(capsys, a, b, "--out", tmp_path / "out", "--names", "A,B", "--bootstrap", 300)
    assert code == 0, err
    assert summary["runs"] == ["A", "B"]
    (pair,) = summary["pairs"]
    assert pair["mcnemar_p"] < 1e-4 and pair["accuracy_difference"] == pytest.approx(28 / 40)
    comparison = json.loads((tmp_path / "out/comparison.json").read_text())
    (pair,) = comparison["pairs"]
    assert pair["mcnemar"]["b"] == 34 and pair["mcnemar"]["c"] == 6
    assert "A is better" in pair["verdict"] and pair["verdict"].startswith("A − B accuracy +70.0 pp")
    assert 0 <= pair["delong"]["pvalue"] < 0.05 and pair["delong"]["difference"] > 0  # binary: DeLong on P(class 1)
    assert "DeLong" in pair["auc_verdict"] and "A is better" in pair["auc_verdict"]
    _assert_intervals_hold_their_points(comparison)
    assert comparison["runs"][0]["training"] is None and comparison["runs"][1]["training"]["parameters"] == 1234567
    text = (tmp_path / "out/comparison.md").read_text()
    assert "| parameters | n/a | 1.23 M |" in text and "ROC AUC (pneumonia)" in text and "DeLong" in text


def test_rows_are_paired_by_image_id_not_by_order(tmp_path, capsys):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 60)
    probabilities_a = _probabilities(np.where(rng.random(60) < 0.6, labels, (labels + 1) % 4), 4, rng)
    probabilities_b = _probabilities(np.where(rng.random(60) < 0.8, labels, (labels + 2) % 4), 4, rng)
    a = _fake_run(tmp_path, "a", labels, probabilities_a, TUMOURS)
    b = _fake_run(tmp_path / "in_order", "b", labels, probabilities_b, TUMOURS)
    shuffled = _fake_run(tmp_path / "shuffled", "b", labels, probabilities_b, TUMOURS, order=rng.permutation(60))
    results = []
    for other, out in ((b, "out_in_order"), (shuffled, "out_shuffled")):
        code, _, err = _compare(capsys, a, other, "--out", tmp_path / out, "--bootstrap", 200)
        assert code == 0, err
        comparison = json.loads((tmp_path / out / "comparison.json").read_text())
        results.append((comparison["pairs"], [run["metrics"] for run in comparison["runs"]]))
    assert results[0] == results[1]


def _one_line_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_runs_that_cannot_be_compared_are_refused_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 30)
    probabilities = _probabilities(labels, 4, rng)
    a = _fake_run(tmp_path, "a", labels, probabilities, TUMOURS)
    b = _fake_run(tmp_path, "b", labels, probabilities, TUMOURS)
    out = ["--out", tmp_path / "out"]

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    _one_line_error(*_compare(capsys, a, not_a_run, *out)[::2], "is not a jaxmed run", "config.json")

    other_classes = _fake_run(tmp_path, "other_classes", labels, probabilities, ["a", "b", "c", "d"])
    _one_line_error(*_compare(capsys, a, other_classes, *out)[::2], "different classes", "glioma", "'d'")

    _fake_run(tmp_path, "a", labels, probabilities, TUMOURS, split="val")  # a has val predictions, b does not
    _one_line_error(*_compare(capsys, a, b, *out, "--split", "val")[::2], "run b has no val predictions",
                    f"python -m jaxmed.evaluate --workdir {b} --split val")

    ids = [f"image_{i:03d}.png" for i in range(29)] + ["stranger.png"]
    elsewhere = _fake_run(tmp_path, "elsewhere", labels, probabilities, TUMOURS, ids=ids)
    _one_line_error(*_compare(capsys, a, elsewhere, *out)[::2], "not evaluated on the same images", "image_029.png",
                    "stranger.png")

    relabelled = labels.copy()
    relabelled[4] = (relabelled[4] + 1) % 4
    other_labels = _fake_run(tmp_path, "other_labels", relabelled, probabilities, TUMOURS)
    _one_line_error(*_compare(capsys, a, other_labels, *out)[::2], "different true labels", "image_004.png")

    _one_line_error(*_compare(capsys, a, *out)[::2], "at least two runs")
    _one_line_error(*_compare(capsys, a, b, *out, "--names", "only_one")[::2], "--names has 1 names")
    _one_line_error(*_compare(capsys, a, b)[::2], "--out")  # argparse's complaint, as one line too
    assert not (tmp_path / "out").exists()  # nothing is written before every check has passed


def test_help_describes_the_command(capsys):
    assert compare.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "python -m jaxmed.compare" in text and "--bootstrap" in text and "McNemar" in text


def _tiny_config(seed: int, cache_dir: Path):
    config = config_file("tests/tiny_config.py")
    config.seed = seed
    config.data.cache_dir = str(cache_dir)
    config.train.async_checkpoints = False
    config.train.steps = 4  # one validation, at the end: the runs need only be real, not good
    config.eval.bootstrap = 50  # the runs' own reports; compare draws its own intervals
    config.eval.explain_per_class = 0  # explanation figures are not what is tested here
    return config


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """The tiny ViT trained twice, with different seeds, on the same synthetic data; each evaluated on test."""
    root = tmp_path_factory.mktemp("compare_runs")
    workdirs = []
    for seed in (3, 4):
        workdir = root / f"seed{seed}"
        workdir.mkdir()
        config = _tiny_config(seed, root / "cache")
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))  # as jaxmed.main does
        experiment.train_and_evaluate(config, workdir)
        workdirs.append(workdir)
    return workdirs


def test_cli_compares_two_trained_runs(trained_runs, tmp_path):
    out = tmp_path / "comparison"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "jaxmed.compare", *map(str, trained_runs), "--out", str(out),
                           "--bootstrap", "200"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["runs"] == ["seed3", "seed4"] and summary["num_examples"] == 16
    assert summary["out"] == str(out) and len(summary["pairs"]) == 1
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["class_names"] == TUMOURS and comparison["pairs"][0]["delong"] is None
    for run, workdir in zip(comparison["runs"], trained_runs):
        report = json.loads((workdir / "eval/test/report.json").read_text())
        # the same numbers as the run's own report (up to predictions.csv's 6 significant digits)
        assert run["metrics"]["accuracy"]["value"] == pytest.approx(report["accuracy"])
        assert run["training"] is None or run["training"]["parameters"] > 0
    _assert_intervals_hold_their_points(comparison)
    text = (out / "comparison.md").read_text()
    assert "| seed3 | seed4 |" in text and "McNemar" in text and "recall: pituitary" in text
    for name in ("roc_curves.png", "differences.png"):
        with Image.open(out / name) as image:
            image.verify()
        assert (out / name).stat().st_size > 5000, name
    verdicts = (out / "verdicts.txt").read_text().splitlines()
    assert len(verdicts) == 1 and verdicts[0].startswith("seed3 − seed4 accuracy")
    # comparison.html: both figures embedded, the verdict shown, every tagged number equal to comparison.json
    from test_report_html import _check_page

    text, page = _check_page(out / "comparison.html", comparison, ("pairs.0.mcnemar.pvalue",))
    assert len(page.images) == 2 and len(page.tagged) > 20 and verdicts[0] in text
