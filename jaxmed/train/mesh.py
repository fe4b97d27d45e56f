"""The device mesh (axes `data` and `fsdp`) and the few rules that place parameters and batches on it."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmed.errors import JaxmedError

# Parameters smaller than this stay replicated: sharding a bias costs more in collectives than it saves.
FSDP_MIN_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """`data` × `fsdp` over all devices; -1 takes what the other axis leaves. On one host a smaller mesh uses
    the first devices (e.g. data=1 to compare with a single-device run)."""
    count = jax.device_count()
    if data == -1:
        data = count // fsdp
    if fsdp == -1:
        fsdp = count // data
    size = data * fsdp
    if size != count and (jax.process_count() > 1 or size > count or size < 1):
        raise JaxmedError(f"mesh data={data} × fsdp={fsdp} does not fit the {count} devices; "
                          "set --config.mesh.data and --config.mesh.fsdp so their product is the device count")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:size])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over every device: with fsdp, each device still sees its own slice of the batch."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """FSDP rule: split the largest axis divisible by the fsdp size; small or indivisible tensors replicate."""
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(mesh: Mesh, abstract_tree):
    """A sharding for every array leaf of an abstract (ShapeDtypeStruct) pytree; scalars replicate."""
    return jax.tree.map(lambda leaf: param_sharding(mesh, tuple(leaf.shape)), abstract_tree)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This host's numpy batch → global jax arrays laid out over the mesh (works on one host and many)."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local.items()}
