"""train.trackers: Weights & Biases (offline) and MLflow (local file store) hold what metrics.jsonl holds, the config,
the test evaluation; a resumed run continues the same tracker runs; a tracker that cannot start is a warning."""

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_config
from jaxmed import experiment
from jaxmed.errors import JaxmedError
from jaxmed.train import trackers

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def _config(workdir: Path):
    config = tiny_config.get_config()
    config.data.cache_dir = str(workdir.parent / "cache")
    config.train.async_checkpoints = False
    config.eval.bootstrap = 0
    config.eval.explain_per_class = 0
    config.train.trackers = ("tensorboard", "wandb", "mlflow")
    config.train.mlflow.tracking_uri = (workdir.parent / "mlruns").as_uri()
    return config


def _wandb_records(workdir: Path) -> list[list[dict]]:
    """Each offline run's records, oldest first, read with wandb's own reader of .wandb transaction logs."""
    runs = []
    for path in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
        output = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                                capture_output=True, text=True, check=True, timeout=120).stdout
        runs.append([json.loads(line) for line in output.splitlines()])
    return runs


def _jsonl(workdir: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(row["step"], key): value for row in rows for key, value in row.items() if key != "step"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny run with all three trackers, preempted (SIGTERM) at step 4, resumed to step 8 and evaluated: one
    tracker run must hold both sessions."""
    import os
    import signal

    workdir = tmp_path_factory.mktemp("tracked") / "run"
    workdir.mkdir()
    original_log = trackers.Trackers.log

    def preempted_after_step_4(self, step, metrics):
        original_log(self, step, metrics)
        if step == 4 and "val/accuracy" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler saves at this step and returns

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        with pytest.MonkeyPatch.context() as preempting:
            preempting.setattr(trackers.Trackers, "log", preempted_after_step_4)
            assert experiment.train_and_evaluate(_config(workdir), workdir) == {"preempted_at": 4}
        state_after_preemption = json.loads((workdir / trackers.STATE_FILE).read_text())
        result = experiment.train_and_evaluate(_config(workdir), workdir)
    assert result["steps"] == 8
    return workdir, state_after_preemption


def test_wandb_offline_history_equals_metrics_jsonl_and_resume_keeps_the_run(tracked_run):
    workdir, state_after_preemption = tracked_run
    runs = _wandb_records(workdir)
    assert len(runs) == 2  # the process preempted at step 4; the resumed one, which also evaluated
    run_ids = {record["run"]["run_id"] for records in runs for record in records if record["type"] == "run"}
    assert run_ids == {state_after_preemption["wandb"]["id"]}  # one wandb run, continued
    logged = {}
    for records in runs:
        for record in records:
            if record["type"] == "history":
                item = record["history"]["item"]
                logged.update({(item["step"], key): value for key, value in item.items()
                               if not key.startswith("_") and key != "step"})
    expected = _jsonl(workdir)
    assert {step for step, _ in expected} == set(range(1, 9))
    scalars = {key: value for key, value in logged.items() if isinstance(value, (int, float))}
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key
    assert scalars[(8, "test/accuracy")] == pytest.approx(
        json.loads((workdir / "eval/test/report.json").read_text())["accuracy"])
    figures = {(step, key[:-len("._type")]) for (step, key), value in logged.items() if value == "image-file"}
    assert {(8, "test/confusion_matrix"), (8, "test/roc_curves"), (8, "test/reliability_diagram")} <= figures
    config_records = [record["run"]["config"]["update"] for records in runs for record in records
                      if record["type"] == "run"]
    assert config_records[0]["train"]["batch_size"] == 8 and config_records[0]["seed"] == 3


def test_mlflow_file_store_holds_metrics_params_and_figures_of_one_resumed_run(tracked_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    workdir, state_after_preemption = tracked_run
    state = json.loads((workdir / trackers.STATE_FILE).read_text())
    assert state["mlflow"] == state_after_preemption["mlflow"]
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    mlflow.set_tracking_uri(state["mlflow"]["tracking_uri"])
    run = mlflow.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    experiment_runs = client.search_runs([run.info.experiment_id])
    assert [found.info.run_id for found in experiment_runs] == [run.info.run_id]  # resumed, not a second run
    assert run.data.params["train.batch_size"] == "8" and run.data.params["model.name"] == "vit"
    expected = _jsonl(workdir)
    for key in {key for _, key in expected}:
        history = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({step: value for (step, name), value in expected.items() if name == key})
    report = json.loads((workdir / "eval/test/report.json").read_text())
    assert run.data.metrics["test/accuracy"] == pytest.approx(report["accuracy"])
    assert run.data.metrics["test/macro/f1"] == pytest.approx(report["macro"]["f1"])
    artifacts = {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "figures")}
    assert {"confusion_matrix.png", "roc_curves.png", "reliability_diagram.png"} <= artifacts


def test_a_tracker_that_cannot_start_is_one_warning_and_never_a_hang(tmp_path, monkeypatch, caplog):
    """An MLflow server that accepts connections and never answers (MLflow itself would wait minutes, retrying),
    and wandb not installed: both are warnings, the others keep logging."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    config = tiny_config.get_config()
    config.train.trackers = ("tensorboard", "wandb", "mlflow")
    config.train.tracker_start_timeout = 2.0
    config.train.mlflow.tracking_uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError, as when it is not installed
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="jaxmed.train"):
        opened = trackers.Trackers(tmp_path, config)
    elapsed = time.perf_counter() - started
    silent.close()
    assert elapsed < 10
    assert [tracker.name for tracker in opened.open] == ["tensorboard"]
    warnings = [record.getMessage() for record in caplog.records]
    assert any("wandb did not start (ModuleNotFoundError" in line and "pip install 'jaxmed[wandb]'" in line
               for line in warnings), warnings
    assert any("mlflow did not start within 2 s" in line for line in warnings), warnings
    assert all("\n" not in line for line in warnings)
    opened.log(1, {"train/loss": 0.5})
    opened.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_unknown_tracker_is_a_config_error_and_headline_leaves_tables_out():
    with pytest.raises(JaxmedError, match="'neptune' is not one of tensorboard, wandb, mlflow"):
        trackers.check_names(("tensorboard", "neptune"))
    report = {"accuracy": 0.5, "num_examples": 4, "macro": {"f1": 0.25}, "per_class": {"a": {"f1": 1.0}},
              "confusion_matrix": [[1, 0], [0, 1]], "roc_auc": {"macro": 0.75, "per_class": {"a": 0.5}},
              "sensitivity": None, "calibration": {"temperature": 1.5, "applied": True, "after": {"ece_15": 0.1}}}
    assert trackers.headline(report, "test") == {
        "test/accuracy": 0.5, "test/num_examples": 4.0, "test/macro/f1": 0.25, "test/roc_auc/macro": 0.75,
        "test/calibration/temperature": 1.5, "test/calibration/after/ece_15": 0.1}


def test_mlflow_run_id_in_the_workdir_is_continued_and_a_vanished_one_replaced(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    config = tiny_config.get_config()
    config.train.trackers = ("mlflow",)
    config.train.mlflow.tracking_uri = (tmp_path / "mlruns").as_uri()
    first = trackers.Trackers(tmp_path, config)
    first.log(1, {"train/loss": 2.0})
    first.close()
    again = trackers.Trackers(tmp_path, config)
    again.log(2, {"train/loss": 1.0})
    again.close()
    state = json.loads((tmp_path / trackers.STATE_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    assert [(m.step, m.value) for m in client.get_metric_history(state["run_id"], "train/loss")] == [(1, 2.0),
                                                                                                    (2, 1.0)]
    (tmp_path / trackers.STATE_FILE).write_text(json.dumps({"mlflow": {**state, "run_id": "0" * 32}}))
    with caplog.at_level(logging.WARNING, logger="jaxmed.train"):
        replaced = trackers.Trackers(tmp_path, config)
    replaced.close()
    assert any("is gone from" in record.getMessage() for record in caplog.records)
    assert [tracker.name for tracker in replaced.open] == [] and json.loads(
        (tmp_path / trackers.STATE_FILE).read_text())["mlflow"]["run_id"] not in (state["run_id"], "0" * 32)
