"""Compile targets as users rent them (targets.toml): their abstract devices, without the hardware, from libtpu's
or the CUDA plugin's deviceless compiler (GUIDE §7)."""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from importlib import resources

from jaxmed.errors import JaxmedError

EXTRAS = {"tpu": "aot-tpu", "cuda": "aot-gpu"}


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    target_config: str = ""  # GPU: the GpuTargetConfigProto text file in gpu_targets/


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda"
    chip: Chip
    hosts: int
    devices: int
    topology: str = ""  # TPU: libtpu's topology name
    chips_per_host: tuple = ()
    megacore: bool = False


@functools.cache
def _table() -> dict:
    return tomllib.loads(resources.files("jaxmed.compile").joinpath("targets.toml").read_text())


def known_targets() -> list[str]:
    table = _table()
    return list(table["tpu"]) + list(table["gpu"])


def target(name: str) -> Target:
    """The target called `name` (a gcloud accelerator type or a GPU node such as h100x8)."""
    table = _table()
    chips = {key: Chip(key, **value) for key, value in table["chips"].items()}
    if name in table["tpu"]:
        entry = table["tpu"][name]
        bounds = tuple(entry["chips_per_host"])
        chips_total = _grid_size(entry["topology"].split(":")[1])
        per_host = bounds[0] * bounds[1] * bounds[2]
        return Target(name, "tpu", chips[entry["chip"]], chips_total // per_host, chips_total,
                      entry["topology"], bounds, entry.get("megacore", False))
    if name in table["gpu"]:
        entry = table["gpu"][name]
        return Target(name, "cuda", chips[entry["chip"]], entry["hosts"], entry["hosts"] * entry["gpus_per_host"])
    raise JaxmedError(f"unknown target {name!r}; known targets: {', '.join(known_targets())}")


def _grid_size(grid: str) -> int:
    size = 1
    for side in grid.split("x"):
        size *= int(side)
    return size


def prepare_process() -> None:
    """Before jax starts: the deviceless compilers need only the CPU backend in this process (the CUDA plugin's
    start-up check fails without a GPU), and libtpu must not insist on its one-process lock: another jax process on
    the machine may hold it without compiling anything."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu otherwise probes GCE metadata for a TPU it does not need for compiling
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import sys

    if "jax" in sys.modules:  # imported already (e.g. by a config file): jax read JAX_PLATFORMS at import
        import jax

        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def devices(target: Target) -> list:
    """The target's abstract devices, in the order a real VM enumerates them."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        _require("libtpu", "tpu")
        options = {"chips_per_host_bounds": target.chips_per_host}
        if target.megacore:
            options["chip_config_name"] = "megacore"
        return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **options).devices)
    _require("jax_plugins.xla_cuda12", "cuda")
    text = resources.files("jaxmed.compile").joinpath("gpu_targets", target.chip.target_config).read_text()
    gpus_per_host = target.devices // target.hosts
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{target.hosts}x{gpus_per_host}",
                                                target_config=text)
    except NotImplementedError as error:
        raise JaxmedError(f"the CUDA plugin cannot describe {target.name} ({error}); run with JAX_PLATFORMS=cpu "
                          "(python -m jaxmed.aot sets it unless JAX_PLATFORMS is already set)") from None
    return list(topology.devices)


def _require(module: str, platform: str) -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a submodule's parent package (jax_plugins) is missing too
        found = False
    if not found:
        raise JaxmedError(f"the {platform.upper()} compiler is not installed: pip install 'jaxmed[{EXTRAS[platform]}]' "
                          f"(it provides {module})")
