"""Entry point: `python -m jaxmed.main --config configs/X.py --workdir W [--config.key=value ...]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

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
            file_config = _file_config(sys.argv)
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


def _file_config(argv: list[str]):
    """The config file's own values, before --config.* overrides (None without --config)."""
    import importlib.util

    config_file = next((a.split("=", 1)[1] if "=" in a else argv[i + 1]
                        for i, a in enumerate(argv) if a.split("=")[0] == "--config" and (
                            "=" in a or i + 1 < len(argv))), None)
    if config_file is None:
        return None
    spec = importlib.util.spec_from_file_location("experiment_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _file_config_missing(argv: list[str]) -> bool:
    """--config.x=y without --config FILE: absl would only say "Unknown command line flag"."""
    return (any(a.startswith("--config.") for a in argv)
            and not any(a.split("=")[0] == "--config" for a in argv))


def _unknown_key_message(argv: list[str], error: Exception) -> str:
    """`--config.train.epoch=3` → name the bad key and list the valid ones at that level."""
    overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    hint = " ".join(str(error).replace("\\n", " ").replace("\\", "").replace("'", "").split())
    config = _file_config(argv)
    if config is None:
        if overrides:
            return (f"--config.{overrides[0]} needs --config FILE (configs/*.py); an existing run resumes with its "
                    "stored config and takes no overrides")
        return f"bad config override: {hint}"
    for override in overrides:
        node, parts = config, override.split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none: not a section)"
                return f"unknown config key --config.{override} ({hint}); valid keys of {where}: {valid}"
            node = node[part]
    return f"bad config override: {hint}"


def run() -> None:
    if _file_config_missing(sys.argv):
        print(f"error: {_unknown_key_message(sys.argv, ValueError())}", file=sys.stderr)
        sys.exit(2)
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except (flags.Error, AttributeError, KeyError) as error:  # raised while absl parses --config.x=y
        print(f"error: {_unknown_key_message(sys.argv, error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
