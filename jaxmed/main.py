"""Entry point: `python -m jaxmed.main --config configs/X.py --workdir W [--config.key=value ...]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from jaxmed import cli
from jaxmed.cli import run_absl

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_NO_CONFIG = ("--config is required unless {workdir} is an existing run (then it resumes with its stored config.json): "
              "add --config configs/demo.py (or another configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, reports; reused to resume")


def main(argv) -> int:
    del argv
    from jaxmed.distributed import maybe_initialize_distributed, setup_logging
    from jaxmed.errors import JaxmedError

    setup_logging()
    if _WORKDIR.value is None:
        print("error: --workdir is required (where checkpoints, metrics and reports go)", file=sys.stderr)
        return 2
    if _CONFIG.value is None and "://" not in _WORKDIR.value and not (Path(_WORKDIR.value) / "config.json").exists():
        print(f"error: {_NO_CONFIG.format(workdir=_WORKDIR.value)}", file=sys.stderr)  # before jax's start-up
        return 2
    try:
        maybe_initialize_distributed()
        import jax

        from jaxmed import config_history, crossval, experiment
        from jaxmed.data.source_keys import check_read_keys
        from jaxmed.train.checkpoint import workdir_path

        workdir = workdir_path(_WORKDIR.value)  # local or gs://…
        config = _CONFIG.value if _CONFIG.value is not None else _stored_config(workdir)
        if _CONFIG.value is not None:  # a stored config was checked when its run started
            file_config = cli.file_config(sys.argv)
            check_read_keys(config.data, file_config.data if file_config is not None else None)
        config_history.check_resume(config, workdir)
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        run = crossval.cross_validate if config.train.folds else experiment.train_and_evaluate
        result = run(config, workdir)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns instead)
        print("interrupted (Ctrl-C): nothing new was saved; run the same command again to resume", file=sys.stderr)
        return 130
    summary = {k: v for k, v in result.items() if k not in ("history", "outcome")}
    if "test" in summary:
        summary["test"] = {k: summary["test"][k] for k in ("accuracy", "balanced_accuracy", "checkpoint")}
    for line in result.get("outcome", ()):
        print(line, flush=True)
    print(json.dumps(summary), flush=True)
    return 130 if result.get("signal") == "SIGINT" else 0


def _stored_config(workdir):
    """No --config: an existing run resumes with the config it was started with."""
    from jaxmed.config import load_run_config
    from jaxmed.errors import JaxmedError

    if not (workdir / "config.json").exists():
        raise JaxmedError(_NO_CONFIG.format(workdir=workdir))
    return load_run_config(workdir)


def run() -> None:
    run_absl(main)


if __name__ == "__main__":
    run()
