"""Evaluation: a checkpoint → predictions → metrics with intervals (metrics.py), calibration, figures
(figures.py), explanations (explain.py) → W/eval/<split>/ (report.py). `python -m jaxmed.evaluate` runs it."""

from jaxmed.evaluate.report import evaluate_run, evaluate_workdir, main, markdown, write_predictions, write_report

__all__ = ["evaluate_run", "evaluate_workdir", "main", "markdown", "write_predictions", "write_report"]
