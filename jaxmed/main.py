"""Entry point: `python -m jaxmed.main --config configs/X.py --workdir W [--config.key=value ...]`."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, reports; reused to resume")


def maybe_initialize_distributed() -> None:
    """Join a multi-host job when the environment describes one (TPU VM pods set it up themselves)."""
    import jax

    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not os.environ.get("TPU_NAME"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # Cloud TPU VM slice: everything comes from the TPU metadata
    if jax.process_count() > 1:
        logging.getLogger("jaxmed").info("process %d of %d, %d local devices of %d", jax.process_index(),
                                         jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv) -> int:
    del argv
    from jaxmed.errors import JaxmedError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if _WORKDIR.value is None:
        print("error: --workdir is required (where checkpoints, metrics and reports go)", file=sys.stderr)
        return 2
    config = _CONFIG.value
    try:
        maybe_initialize_distributed()
        from jaxmed import train

        workdir = Path(_WORKDIR.value)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        result = train.train_and_evaluate(config, workdir)
    except JaxmedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "history"}
    if "test" in summary:
        summary["test"] = {k: summary["test"][k] for k in ("accuracy", "balanced_accuracy", "checkpoint")}
    print(json.dumps(summary), flush=True)
    return 0


def run() -> None:
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except flags.Error as error:  # unknown --config.x: say which keys exist
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
