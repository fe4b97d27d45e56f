"""Experiment trackers (`train.trackers`): TensorBoard, Weights & Biases and MLflow get what metrics.jsonl gets.

Each tracker receives every scalar at the step metrics.jsonl records, the resolved config as the run's config or
params, and the test evaluation's headline numbers and figures at the end. Its run id lives in W/trackers.json so a
resumed run continues the same tracker run. A tracker is a convenience, never a reason to stop training: one that
cannot start (not installed, no credentials, no network, a server that does not answer within
`train.tracker_start_timeout` seconds) or fails mid-run is a one-line warning and training goes on without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
import time

from etils import epath

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.train")
STATE_FILE = "trackers.json"  # {"wandb": {"id": ...}, "mlflow": {"run_id": ..., "tracking_uri": ...}}
# The evaluation's figures a dashboard shows beside the numbers (written by jaxmed.evaluate.report).
FIGURES = ("confusion_matrix.png", "roc_curves.png", "pr_curves.png", "reliability_diagram.png")
# Report entries that are not headline numbers: per-class tables, matrices, intervals, settings.
NOT_HEADLINE = frozenset({"per_class", "confusion_matrix", "ci95", "bootstrap", "class_names", "operating_point"})
MLFLOW_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values
# The trackers of the experiment running in this context (session()), which the training loop's writer logs to.
_SESSION: contextvars.ContextVar = contextvars.ContextVar("jaxmed_trackers", default=None)


class TensorBoard:
    """tensorboardX event files in W/tensorboard (what jaxmed always wrote)."""

    name = "tensorboard"

    def __init__(self, workdir, config, stored: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_figures(self, step: int, figures: dict) -> None:
        import numpy as np
        from PIL import Image

        for name, path in figures.items():
            self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run in project `train.wandb.project`; WANDB_MODE=offline keeps it in W/wandb for
    `wandb sync`. Our step is the x-axis metric "step", so values a resumed run logs again are kept, not dropped
    as steps lower than wandb's own counter."""

    name = "wandb"

    def __init__(self, workdir, config, stored: dict):
        import wandb

        settings = config.train.wandb
        from wandb.sdk.lib import runid

        self.id = stored.get("id") or runid.generate_id()
        local = "://" not in str(workdir)  # wandb writes its files locally; an object-store workdir cannot host them
        self.run = wandb.init(project=settings.project, entity=settings.entity or None,
                              name=settings.name or epath.Path(workdir).name, tags=list(settings.tags) or None,
                              id=self.id, resume="allow", config=_config_dict(config),
                              dir=str(workdir) if local else None,
                              settings=wandb.Settings(init_timeout=config.train.tracker_start_timeout,
                                                      console="off", x_disable_stats=True, silent=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def state(self) -> dict:
        return {"id": self.id}

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({**metrics, "step": step})

    def log_figures(self, step: int, figures: dict) -> None:
        import wandb

        self.run.log({**{name: wandb.Image(str(path)) for name, path in figures.items()}, "step": step})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in experiment `train.mlflow.experiment` at `train.mlflow.tracking_uri` (empty: the
    MLFLOW_TRACKING_URI variable, else a file store in W/mlruns). Metrics are logged asynchronously so a slow
    server never holds a training step."""

    name = "mlflow"

    def __init__(self, workdir, config, stored: dict):
        import mlflow
        from mlflow.tracking import MlflowClient

        settings = config.train.mlflow
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri and "://" not in str(workdir):
            uri = (epath.Path(workdir) / "mlruns").resolve().as_uri()
        if not uri:
            raise JaxmedError("set train.mlflow.tracking_uri (or MLFLOW_TRACKING_URI): an object-store workdir "
                              "cannot hold an MLflow file store")
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store behind an opt-out; the user asked for exactly this store.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow, self.uri = mlflow, uri
        self.client = MlflowClient(tracking_uri=uri)
        run_id = stored.get("run_id") if stored.get("tracking_uri") == uri else None
        if run_id is not None and _exists(lambda: self.client.get_run(run_id)):
            self.client.update_run(run_id, status="RUNNING")
        else:
            if run_id is not None:
                log.warning("MLflow run %s of %s is gone from %s: starting a new one", run_id, STATE_FILE, uri)
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(settings.experiment))
            run_id = self.client.create_run(experiment_id, run_name=epath.Path(workdir).name).info.run_id
            params = [mlflow.entities.Param(key, str(value)[:MLFLOW_PARAM_LENGTH])
                      for key, value in _flatten(_config_dict(config)).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[start:start + 100])
        self.run_id, self.pending = run_id, []

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, step: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        batch = [self.mlflow.entities.Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_figures(self, step: int, figures: dict) -> None:
        for path in figures.values():
            self.client.log_artifact(self.run_id, str(path), "figures")

    def close(self) -> None:
        for operations in self.pending:
            operations.wait()
        self.client.set_terminated(self.run_id)


TRACKERS = {tracker.name: tracker for tracker in (TensorBoard, WandB, MLflow)}


def check_names(names) -> list[str]:
    """train.trackers as a list; unknown names are a config error (the only tracker problem that stops a run)."""
    if isinstance(names, str):
        names = (names,)
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise JaxmedError(f"train.trackers={tuple(names)!r}: {', '.join(map(repr, unknown))} is not one of "
                          f"{', '.join(TRACKERS)}; e.g. --config.train.trackers='(\"tensorboard\",\"wandb\")'")
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def session(workdir, config):
    """Trackers opened once for all that happens inside — training, then the test evaluation — so one process's
    run is one tracker session (one wandb offline directory); closed at the end. None on processes other than 0."""
    import jax

    if jax.process_index() != 0:
        yield None
        return
    opened = Trackers(workdir, config)
    token = _SESSION.set(opened)
    try:
        yield opened
    finally:
        _SESSION.reset(token)
        opened.close()


def for_run(workdir, config) -> tuple[Trackers, bool]:
    """(the session's trackers when one is open for this workdir, else new ones; whether the caller owns them)."""
    current = _SESSION.get()
    if current is not None and str(current.workdir) == str(epath.Path(workdir)):
        return current, False
    return Trackers(workdir, config), True


class Trackers:
    """The trackers of one run (process 0 only), each started within the time box; failures become warnings."""

    def __init__(self, workdir, config):
        self.workdir, self.timeout = epath.Path(workdir), float(config.train.get("tracker_start_timeout", 60.0))
        self.workdir.mkdir(parents=True, exist_ok=True)
        state_path = self.workdir / STATE_FILE
        stored = json.loads(state_path.read_text()) if state_path.exists() else {}
        self.open = []
        for name in check_names(config.train.get("trackers", ("tensorboard",))):
            tracker = _within(self.timeout, f"{name} did not start",
                              lambda name=name: TRACKERS[name](workdir, config, stored.get(name, {})),
                              on_late_result=lambda late: late.close(), extra=name)
            if tracker is not None:
                self.open.append(tracker)
        state = {tracker.name: tracker.state() for tracker in self.open if hasattr(tracker, "state")}
        if state and state != {name: stored.get(name) for name in state}:
            state_path.write_text(json.dumps({**stored, **state}, indent=1) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        self._each("log", step, metrics)

    def log_evaluation(self, step: int, report: dict, figures_dir, split: str = "test") -> None:
        """The report's headline numbers as `<split>/<name>` scalars and its figures, at the run's last step."""
        self._each("log", step, headline(report, split))
        figures = {f"{split}/{name[:-4]}": epath.Path(figures_dir) / name for name in FIGURES
                   if (epath.Path(figures_dir) / name).exists()}
        if figures:
            self._each("log_figures", step, figures)

    def close(self) -> None:
        for tracker in self.open:
            _within(self.timeout, f"{tracker.name} did not finish", tracker.close)
        self.open = []

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.open):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # a dashboard failing mid-run must not end the training
                log.warning("%s failed (%s); training goes on without it", tracker.name, _one_line(error))
                self.open.remove(tracker)


def headline(report: dict, split: str) -> dict:
    """The report's numbers worth a dashboard: top-level scalars and those one level down (macro/weighted
    averages, ROC AUC, calibration), as `<split>/<path>`; per-class tables, matrices and intervals are left out."""
    numbers = {}

    def walk(value, path: list[str]) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            numbers["/".join([split, *path])] = float(value)
        elif isinstance(value, dict) and len(path) < 3:
            for key, inner in value.items():
                if key not in NOT_HEADLINE:
                    walk(inner, [*path, str(key)])

    walk(report, [])
    return numbers


def _within(seconds: float, what: str, call, on_late_result=None, extra: str = ""):
    """call() in a daemon thread, waited for `seconds`: its result, or None after a one-line warning when it raised
    or is still running (a thread that never returns cannot hold up training, nor the interpreter's exit). An
    ImportError names the extra to install."""
    outcome, lock, abandoned = {}, threading.Lock(), []

    def target():
        try:
            value = call()
        except BaseException as error:  # noqa: BLE001 (wandb raises its own errors, some not Exceptions)
            outcome["error"] = error
            return
        with lock:
            if abandoned and on_late_result is not None:
                try:
                    on_late_result(value)
                except Exception:  # nobody is listening any more
                    pass
            outcome["value"] = value

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(seconds)
    with lock:
        if "value" in outcome:
            return outcome["value"]
        if "error" in outcome:
            log.warning("tracker %s (%s); training goes on without it", what, _one_line(outcome["error"], extra))
        else:
            abandoned.append(True)
            log.warning("tracker %s within %g s (train.tracker_start_timeout); training goes on without it", what,
                        seconds)
    return None


def _one_line(error: BaseException, extra: str = "") -> str:
    text = " ".join(str(error).split()) or "no message"
    if isinstance(error, ImportError) and extra:
        text += f" — pip install 'jaxmed[{extra}]'"
    return f"{type(error).__name__}: {text[:300]}"


def _exists(get) -> bool:
    try:
        get()
        return True
    except Exception:  # MLflow raises MlflowException (RESOURCE_DOES_NOT_EXIST) for a deleted or foreign run id
        return False


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat
