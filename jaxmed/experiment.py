"""An experiment as `python -m jaxmed.main` runs it: train a run, then evaluate its best checkpoint on test, and say
what was evaluated and what was skipped, and why."""

from __future__ import annotations

from jaxmed import train
from jaxmed.evaluate import ood, report
from jaxmed.train import trackers
from jaxmed.train.checkpoint import Checkpoints, workdir_path


def train_and_evaluate(config, workdir) -> dict:
    """Check the data's classes, train (resuming when W/checkpoints exists), then write W/eval/test/ from the best
    checkpoint by validation.

    → {"steps", "history", "evaluated", "skipped", "outcome", "test": report} or {"preempted_at": step, ...}.
    "evaluated" / "skipped" map what the end of training did / did not to where it went / why; "outcome" is the
    same in sentences for people.
    """
    ood.check_config(config.eval)  # evaluation fits the OOD detectors after training: a bad key fails now
    with trackers.session(workdir, config) as tracked:  # one tracker session for training and evaluation
        return _train_and_evaluate(config, workdir, tracked)


def _train_and_evaluate(config, workdir, tracked) -> dict:
    from jaxmed.data.class_checks import check_classes

    run = train.setup(config, workdir_path(workdir))
    check_classes(run.dataset, config.data.root or config.data.format)
    result = train.train(config, workdir, run)
    if "preempted_at" in result:
        return result
    run, eval_step = result.pop("run"), result.pop("eval_step")
    splits = run.dataset.splits
    evaluated, skipped = {}, {}
    if "val" not in splits:
        skipped["validation"] = "the data has no val split: nothing was validated during training"
    if not config.train.evaluate_test:
        skipped["test"] = "train.evaluate_test=False"
    elif "test" not in splits:
        skipped["test"] = (f"the data has no test split (it has {', '.join(splits)}); there is nothing held out "
                           "to report on, so jaxmed.evaluate and jaxmed.compare need --split val")
    else:
        checkpoints = Checkpoints.for_run(run.workdir, config.train)
        try:
            result["test"] = report.evaluate_run(run, checkpoints, eval_step, "test")
        finally:
            checkpoints.close()
        if tracked is not None:  # the dashboards get the test numbers and figures beside the training curves
            tracked.log_evaluation(result["steps"], result["test"], run.workdir / "eval" / "test")
        evaluated["test"] = f"{run.workdir}/eval/test/report.html"
        if result["test"]["calibration"]["fitted_on"] is None:
            skipped["calibration"] = ("eval.calibrate=False" if not config.eval.calibrate else
                                      "no val split to fit the temperature on: probabilities are uncalibrated")
    result.update(evaluated=evaluated, skipped=skipped)
    result["outcome"] = ([f"evaluated {split} ({result[split]['checkpoint']}): {path}"
                          for split, path in evaluated.items()]
                         + [f"skipped {what}: {why}" for what, why in skipped.items()])
    return result
