"""Cross-validation means and compare's paired statistics on run directories the tests write themselves."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxmed import crossval
from jaxmed.evaluate import metrics, report

NAMES = ["common", "other", "rare"]


def _probabilities(predictions, num_classes=3, confidence=0.8):
    probabilities = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def _fold(workdir, fold, labels, groups=None):
    """A finished fold: a perfect classifier's report.json, predictions.csv and splits.csv."""
    out = workdir / f"fold_{fold}" / "eval" / "test"
    out.mkdir(parents=True)
    ids = [f"f{fold}_img{i}.png" for i in range(len(labels))]
    probabilities = _probabilities(labels)
    (out / "report.json").write_text(json.dumps(metrics.classification_metrics(labels, probabilities, NAMES,
                                                                               bootstrap=0)))
    report.write_predictions(out / "predictions.csv", ids, labels, probabilities, NAMES)
    rows = "".join(f"{image_id},test,{NAMES[label]},{'' if groups is None else groups[i]}\n"
                   for i, (image_id, label) in enumerate(zip(ids, labels)))
    (workdir / f"fold_{fold}" / "splits.csv").write_text("id,split,class,group\n" + rows)


def test_cv_fold_means_leave_out_folds_without_the_class(tmp_path):
    # The rare class is in folds 0 and 1 only, always found: its recall is 1, not the mean of [1, 1, 0].
    for fold, labels in enumerate([np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 0, 2]), np.array([0, 1, 0, 1, 0])]):
        _fold(tmp_path, fold, labels, groups=[f"p{fold}_{i // 2}" for i in range(len(labels))])
    summary = crossval.summarise(tmp_path, 3, SimpleNamespace(bootstrap=50, seed=0))
    rare = summary["metrics"]["recall/rare"]
    assert rare["values"] == [1.0, 1.0, None]
    assert rare["mean"] == 1.0
    assert any("rare is absent from 1 of 3 folds" in note for note in summary["notes"])
    assert summary["metrics"]["f1_macro"]["values"] == [1.0, 1.0, 1.0]  # the fold without it: macro over present
    assert summary["pooled"]["ci95_methods"]["f1_macro"]["unit"] == "patient"  # groups from the folds' splits.csv
    assert "rare is absent" in (tmp_path / "cv" / "summary.md").read_text()


# ------------------------------------------------------------------------------------------------- paired tests

from jaxmed.evaluate import compare, intervals, paired  # noqa: E402
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402


def test_delong_with_zero_variance_is_no_test():
    # 4 images, A perfect, B constant: DeLong's variance is 0; it said "A is better (p < 0.001)" with [+50, +50].
    labels = np.array([0, 0, 1, 1])
    result = paired.delong(labels, np.array([0.1, 0.2, 0.8, 0.9]), np.full(4, 0.5))
    assert result["pvalue"] is None and result["ci95"] is None and "variance estimate is 0" in result["no_test_reason"]
    sentence = paired.verdict("A", "B", 50.0, None, None, 4, test="DeLong", reason=result["no_test_reason"])
    assert "no test possible (DeLong's variance estimate is 0" in sentence and "better" not in sentence


def test_accuracy_interval_agrees_with_the_exact_mcnemar_test():
    # The review: 5 discordant of 1000 printed "+0.5 pp [+0.1, +1.0], McNemar p = 0.062: no evidence".
    correct_a = np.r_[np.ones(5, bool), np.ones(900, bool), np.zeros(95, bool)]
    correct_b = np.r_[np.zeros(5, bool), np.ones(900, bool), np.zeros(95, bool)]
    test = paired.mcnemar_exact(correct_a, correct_b)
    assert test["pvalue"] == pytest.approx(0.0625)
    low, high = test["ci95"]
    assert low < 0 < high
    rng = np.random.default_rng(7)
    disagreements = 0
    for _ in range(2000):  # many tables, few to many discordant pairs: the interval and p agree on 0 every time
        n = int(rng.integers(20, 2000))
        b, c = (int(x) for x in rng.multinomial(n, [0.02 + 0.1 * rng.random(), 0.02 * rng.random(), 0])[:2])
        p = 1.0 if b + c == 0 else mcnemar([[0, b], [c, 0]], exact=True).pvalue
        low, high = intervals.paired_proportion_difference(b, c, n)
        disagreements += (low > 0 or high < 0) != (p < 0.05)
        assert high > low  # never collapses, not even with no discordant image
    assert disagreements == 0


def test_paired_accuracy_interval_covers_the_true_difference():
    rng = np.random.default_rng(8)
    draws, n, discordance, share = 400, 300, 0.08, 0.7  # true difference = 0.08 · (2 · 0.7 − 1) = 0.032
    truth = discordance * (2 * share - 1)
    covered = 0
    for _ in range(draws):
        cells = [discordance * share, discordance * (1 - share), 1 - discordance]
        b, c = (int(x) for x in rng.multinomial(n, cells)[:2])
        low, high = intervals.paired_proportion_difference(b, c, n)
        covered += low <= truth <= high
    assert 0.95 - 3 * np.sqrt(0.95 * 0.05 / draws) <= covered / draws


def test_holm_keeps_false_winners_rare_among_five_equal_runs(monkeypatch):
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # multipletests collects garbage on every call: 0.1 s here
    rng = np.random.default_rng(9)
    simulations, raw_false, holm_false = 300, 0, 0
    for _ in range(simulations):
        correct = rng.random((5, 150)) < 0.8  # five equally good, independent runs
        tests = [{"pvalue": paired.mcnemar_exact(correct[i], correct[j])["pvalue"]}
                 for i in range(5) for j in range(i + 1, 5)]
        paired.holm(tests)
        raw_false += any(test["pvalue"] < 0.05 for test in tests)
        holm_false += any(test["adjusted_pvalue"] < 0.05 for test in tests)
    assert raw_false / simulations > 0.12  # the review measured 23.6% with its settings
    assert holm_false / simulations <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / simulations)


def _run(name, labels, correct):
    predictions = np.where(correct, labels, 1 - labels)
    return compare.RunPredictions(name, Path(name), [f"img{i}" for i in range(len(labels))], labels,
                                  _probabilities(predictions, 2, 0.7), ["normal", "disease"], None)


def test_compare_verdicts_use_holm_adjusted_p_values():
    labels = np.arange(400) % 2
    base = np.ones(400, bool)
    base[:60] = False
    better = base.copy()
    better[:9] = True  # A right where B is wrong on 9 images …
    better[100] = False  # … and wrong where B is right on 1: exact McNemar p = 0.021
    runs = [_run("A", labels, better), _run("B", labels, base), _run("C", labels, base)]
    result = compare.score(runs, split="test", resamples=50, seed=0)
    first = result["pairs"][0]
    assert first["accuracy_test"]["pvalue"] == pytest.approx(0.0215, abs=1e-3)
    assert first["accuracy_test"]["adjusted_pvalue"] > 0.05
    assert "Holm-adjusted" in first["verdict"] and "no evidence of a difference" in first["verdict"]
    assert "not adjusted for the other pairs" in first["verdict"]
    assert result["multiplicity"] == "Holm over the pairs"
    two = compare.score(runs[:2], split="test", resamples=50, seed=0)
    assert "A is better" in two["pairs"][0]["verdict"] and "adjusted_pvalue" not in two["pairs"][0]["accuracy_test"]


def test_compare_with_patients_resamples_patients_and_says_so():
    rng = np.random.default_rng(10)
    groups = np.repeat(np.arange(60), 5)
    labels = np.repeat(rng.integers(0, 2, 60), 5)
    runs = [_run("A", labels, rng.random(300) < 0.85), _run("B", labels, rng.random(300) < 0.8)]
    result = compare.score(runs, split="test", resamples=200, seed=0, groups=groups.astype(str))
    pair = result["pairs"][0]
    assert result["unit"] == "patient" and pair["paired_bootstrap"]["unit"] == "patient"
    assert pair["accuracy_test"]["test"] == "patient bootstrap" and pair["auc_test"]["unit"] == "patient"
    assert "McNemar assumes independent images" in compare.markdown(result)
    assert result["runs"][0]["metrics"]["roc_auc_macro"]["unit"] == "patient"


def test_compare_reads_patients_from_splits_csv(tmp_path):
    rng = np.random.default_rng(11)
    labels = np.repeat(rng.integers(0, 2, 40), 3)
    ids = [f"p{i // 3}_img{i}.png" for i in range(120)]
    for name, accuracy in (("a", 0.9), ("b", 0.8)):
        workdir = tmp_path / name
        (workdir / "eval" / "test").mkdir(parents=True)
        (workdir / "config.json").write_text("{}")
        predictions = np.where(rng.random(120) < accuracy, labels, 1 - labels)
        report.write_predictions(workdir / "eval/test/predictions.csv", ids, labels,
                                 _probabilities(predictions, 2, 0.7), ["normal", "disease"])
        (workdir / "splits.csv").write_text("id,split,class,group\n" + "".join(
            f"{image_id},test,{['normal', 'disease'][label]},{image_id.split('_')[0]}\n"
            for image_id, label in zip(ids, labels)))
    compare.compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out", resamples=100)
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert result["unit"] == "patient" and result["pairs"][0]["accuracy_test"]["test"] == "patient bootstrap"
    assert "patients as clusters" in result["runs"][0]["metrics"]["accuracy"]["method"]


def test_evaluation_of_a_folder_with_patient_ids_has_patient_level_intervals(tmp_path):
    from helpers_configs import config_file
    from test_patient_splits import _kermany_folder

    from jaxmed import experiment, protocols

    config = config_file("tests/tiny_config.py")
    config.data.update(format="imagefolder", root=str(_kermany_folder(tmp_path / "data")),
                       cache_dir=str(tmp_path / "cache"), merge_train_val=True, val_fraction=0.25,
                       group_pattern=protocols.KERMANY_PATIENT)
    config.train.async_checkpoints = False
    config.eval.update(bootstrap=50, explain_per_class=0, positive_class="PNEUMONIA", target_recall=0.9)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    experiment.train_and_evaluate(config, workdir)
    result = json.loads((workdir / "eval/test/report.json").read_text())
    assert {made["unit"] for made in result["ci95_methods"].values()} == {"patient"}
    assert "patients as clusters" in result["ci95_methods"]["accuracy"]["method"]
    assert result["operating_point"]["test"]["ci95_method"]["unit"] == "patient"
    assert "unit: patient" in (workdir / "eval/test/report.md").read_text()
