"""Entry point: `python -m jaxmed.main --config configs/X.py --workdir W [--config.key=value ...]`."""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, reports; reused to resume")


def main(argv) -> int:
    del argv
    from jaxmed.distributed import maybe_initialize_distributed, setup_logging
    from jaxmed.errors import JaxmedError

    setup_logging()
    if _WORKDIR.value is None:
        print("error: --workdir is required (where checkpoints, metrics and reports go)", file=sys.stderr)
        return 2
    config = _CONFIG.value
    try:
        maybe_initialize_distributed()
        import jax

        from jaxmed import crossval, experiment
        from jaxmed.train.checkpoint import workdir_path

        workdir = workdir_path(_WORKDIR.value)  # local or gs://…
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        run = crossval.cross_validate if config.train.folds else experiment.train_and_evaluate
        result = run(config, workdir)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "history"}
    if "test" in summary:
        summary["test"] = {k: summary["test"][k] for k in ("accuracy", "balanced_accuracy", "checkpoint")}
    print(json.dumps(summary), flush=True)
    return 0


def _unknown_key_message(argv: list[str], error: Exception) -> str:
    """`--config.train.epoch=3` → name the bad key and list the valid ones at that level."""
    import importlib.util

    config_file = next((a.split("=", 1)[1] if "=" in a else argv[i + 1]
                        for i, a in enumerate(argv) if a.split("=")[0] == "--config"), None)
    overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    hint = " ".join(str(error).replace("\\n", " ").replace("\\", "").replace("'", "").split())
    if config_file is None:
        return f"bad config override: {hint}"
    spec = importlib.util.spec_from_file_location("experiment_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
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
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except (flags.Error, AttributeError, KeyError) as error:  # raised while absl parses --config.x=y
        print(f"error: {_unknown_key_message(sys.argv, error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
