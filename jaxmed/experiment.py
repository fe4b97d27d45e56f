"""An experiment as `python -m jaxmed.main` runs it: train a run, then evaluate its best checkpoint on test."""

from __future__ import annotations

from jaxmed import train
from jaxmed.evaluate import ood, report
from jaxmed.train import trackers
from jaxmed.train.checkpoint import Checkpoints


def train_and_evaluate(config, workdir) -> dict:
    """Train (resuming when W/checkpoints exists), then write W/eval/test/ from the best checkpoint by validation.

    → {"steps", "history", "test": report} or {"preempted_at": step}.
    """
    ood.check_config(config.eval)  # evaluation fits the OOD detectors after training: a bad key fails now
    with trackers.session(workdir, config) as tracked:  # one tracker session for training and evaluation
        return _train_and_evaluate(config, workdir, tracked)


def _train_and_evaluate(config, workdir, tracked) -> dict:
    result = train.train(config, workdir)
    if "preempted_at" in result:
        return result
    run, eval_step = result.pop("run"), result.pop("eval_step")
    if config.train.evaluate_test and "test" in run.dataset.splits:
        checkpoints = Checkpoints.for_run(run.workdir, config.train)
        try:
            result["test"] = report.evaluate_run(run, checkpoints, eval_step, "test")
        finally:
            checkpoints.close()
        if tracked is not None:  # the dashboards get the test numbers and figures beside the training curves
            tracked.log_evaluation(result["steps"], result["test"], run.workdir / "eval" / "test")
    return result
