"""Joining a multi-host job, and the logging every command-line entry point sets up first."""

from __future__ import annotations

import logging
import os

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed")


def maybe_initialize_distributed() -> None:
    """Join a multi-host job when the environment describes one.

    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID: any cluster (GPU hosts, local processes over
    gloo). JAXMED_DISTRIBUTED=1 (set by launch/tpu.py), or GKE/multislice TPU variables: Cloud TPU, where
    jax.distributed finds the slice's hosts itself.
    """
    import jax

    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [key for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(key)]
        if missing:
            raise JaxmedError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three "
                              "(process count, and this process's id from 0) or none")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not os.environ.get("TPU_NAME"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif (os.environ.get("JAXMED_DISTRIBUTED") == "1" or os.environ.get("TPU_WORKER_HOSTNAMES")
          or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()  # Cloud TPU: coordinator, process count and id come from the TPU metadata
    if jax.process_count() > 1:
        log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def setup_logging() -> None:
    """INFO for jaxmed; the libraries' chatter (absl, jax, orbax, grain) only from warnings up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
