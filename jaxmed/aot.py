"""Compile a config's train and eval steps for a TPU slice or GPU node this machine does not have, and say whether
they fit, what batch fits and how fast they could go at best:

    python -m jaxmed.aot --config configs/X.py [--config.key=value ...] --target v5litepod-8 [--target h100x8 ...]
                         [--fit-batch] [--num-classes N] [--out DIR]

Prints a table, writes DIR/aot.json (a list of records, one per target and program), and ends with a JSON summary.
Shapes only: no weights, no data. TPU targets need the aot-tpu extra, GPU targets the aot-gpu extra.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from jaxmed.cli import run_absl

from jaxmed.compile import targets as _targets

_targets.prepare_process()  # before the config file (parsed with the flags) imports jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
_TARGETS = flags.DEFINE_multi_string("target", [], "a TPU accelerator type (v5litepod-8, v4-32, v6e-8, ...) or a "
                                     "GPU node (h100, h100x8, 2xh100x8, h200x8, a100x8); repeatable")
_FIT_BATCH = flags.DEFINE_boolean("fit-batch", False, "also find the largest per-device train batch that fits")
_NUM_CLASSES = flags.DEFINE_integer("num-classes", 0, "classes, when neither the config nor its protocol says and "
                                    "the dataset is not on this machine")
_OUT = flags.DEFINE_string("out", None, "directory for aot.json (created)")


def main(argv) -> int:
    del argv
    from jaxmed.compile import targets

    targets.prepare_process()  # before jax starts a backend
    from jaxmed.distributed import setup_logging
    from jaxmed.errors import JaxmedError

    setup_logging()
    try:
        if _CONFIG.value is None:
            raise JaxmedError("--config is required (an experiment config, e.g. configs/demo.py)")
        if not _TARGETS.value:
            raise JaxmedError(f"--target is required; known targets: {', '.join(targets.known_targets())}")
        from tqdm import tqdm

        from jaxmed.compile import isolated, report

        for name in _TARGETS.value:  # every name checked before the first (slow) compile
            targets.target(name)
        with tqdm(unit="program", desc="compiling", dynamic_ncols=True) as bar:
            records = isolated.compile_all(_CONFIG.value, _TARGETS.value, num_classes=_NUM_CLASSES.value or None,
                                           fit_batch=_FIT_BATCH.value, progress=bar)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.table(records), flush=True)
    if _OUT.value:
        report.write(records, _OUT.value)
    failed = [r for r in records if r.get("error")]
    print(json.dumps({"records": len(records), "fits": all(r.get("fits") for r in records),
                      "failed": len(failed), "aot_json": f"{_OUT.value}/aot.json" if _OUT.value else None}),
          flush=True)
    return 1 if failed else 0


def run() -> None:
    run_absl(main)


if __name__ == "__main__":
    run()
