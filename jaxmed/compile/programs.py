"""The run's real programs — the train step of every phase and the eval step — built from shapes alone over a
target's abstract devices: the same `jaxmed.train` functions the loop calls, with an abstract state in place of
weights and ShapeDtypeStructs in place of data."""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType

from jaxmed import data as jdata
from jaxmed.errors import JaxmedError
from jaxmed.train import mesh as jmesh
from jaxmed.train import optim
from jaxmed.train import run as jrun

# The schedule's length changes constants in the program, not its shapes: any positive count compiles the same step.
NOMINAL_STEPS_PER_EPOCH = 100


@dataclasses.dataclass
class Program:
    name: str  # "train/<phase>" or "eval"
    step: object  # the jitted function
    args: tuple  # its abstract arguments (ShapeDtypeStructs with shardings)
    per_device_batch: int


def model_spec(config) -> jrun.ModelSpec:
    """`jrun.model_spec`, but a hub id this machine cannot fetch falls back to its known config (hub_configs.toml):
    only the shapes matter here. The weights are never read."""
    try:
        return jrun.model_spec(config)
    except JaxmedError:
        known = _hub_configs().get(config.model.init_from)
        if not known:
            raise
    from jaxmed.convert import TABLES
    from jaxmed.models import MODELS

    kwargs = dict(known)
    config_class, _ = MODELS[kwargs.pop("model_type")]
    hf_config = config_class(**kwargs)
    preprocessor = dict(TABLES[hf_config.model_type][1])
    preprocessor.update(config.model.preprocessor.to_dict())
    return jrun.ModelSpec(hf_config, preprocessor, None, remat=jrun._remat(config))


@functools.cache
def _hub_configs() -> dict:
    return tomllib.loads(resources.files("jaxmed.compile").joinpath("hub_configs.toml").read_text())


def class_names(config, num_classes: int | None) -> list[str]:
    """The run's classes without reading its images: --num-classes, data.class_names, the synthetic set, the
    protocol's known list for its dataset, or the class folders of an imagefolder dataset on this machine."""
    from jaxmed import protocols

    if num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    if config.data.class_names:
        return list(config.data.class_names)
    if config.data.format == "synthetic":
        from jaxmed.data.synthetic import CLASS_NAMES
        return list(CLASS_NAMES)
    if config.data.root in protocols.KNOWN_CLASSES:
        return list(protocols.KNOWN_CLASSES[config.data.root])
    if config.data.format == "imagefolder":
        from etils import epath
        for split in ("train", "Training", "classification_task/train", "chest_xray/train"):
            folder = epath.Path(config.data.root) / split
            if folder.is_dir():
                names = sorted(p.name for p in folder.iterdir() if p.is_dir())
                if names:
                    return names
    raise JaxmedError(f"cannot tell the number of classes of data.root={config.data.root!r} without its data; pass "
                      "--num-classes N or set --config.data.class_names")


def target_mesh(config, devices: list, hosts: int, target_name: str) -> jax.sharding.Mesh:
    """`mesh.data` × `mesh.fsdp` over the target's devices, with the rules of `jaxmed.train.mesh.make_mesh`."""
    data, fsdp, count = config.mesh.data, config.mesh.fsdp, len(devices)
    if data == -1:
        data = count // fsdp
    if fsdp == -1:
        fsdp = count // data
    size = data * fsdp
    if size < 1 or size > count or (size != count and hosts > 1):
        raise JaxmedError(f"mesh data={config.mesh.data} × fsdp={config.mesh.fsdp} does not fit {target_name}'s "
                          f"{count} devices; set --config.mesh.data and --config.mesh.fsdp so their product is the "
                          "device count")
    grid = np.asarray(devices[:size], dtype=object).reshape(data, fsdp)
    return jax.sharding.Mesh(grid, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def abstract_run(config, mesh, names: list[str]) -> jrun.Run:
    """A `jaxmed.train.run.Run` without data or weights: what `jrun.setup` builds, minus the dataset."""
    spec = model_spec(config)
    spec.relabelled = _relabel(spec, names)
    preprocessor = jdata.Preprocessor.from_config(spec.preprocessor)
    dtype = jnp.dtype(config.model.dtype)
    abstract = nnx.eval_shape(lambda: jrun.build_model(spec, dtype, config.seed))
    plan = optim.phases(config)
    jrun._check_reconstruction_phases(plan, abstract, spec.hf_config.model_type)
    layernorms = optim.layernorm_paths(abstract)
    abstract.eval()
    graph_eval, *_ = jrun._split(abstract)
    abstract.train()
    graph_train, params, stats, rest = jrun._split(abstract)
    shardings = {"params": jmesh.tree_shardings(mesh, params), "stats": jmesh.tree_shardings(mesh, stats)}
    plan, _ = jrun.training_budget(plan, NOMINAL_STEPS_PER_EPOCH, config.train)
    ends, total = [], 0
    for phase in plan:
        total += max(1, round(phase.epochs * NOMINAL_STEPS_PER_EPOCH))
        ends.append(total)
    return jrun.Run(config, None, spec, None, preprocessor, mesh, graph_train, graph_eval,
                    _placeholder_rest(rest, config.seed), shardings, {"params": params, "stats": stats}, layernorms,
                    NOMINAL_STEPS_PER_EPOCH, plan, ends)


def _relabel(spec, names: list[str]) -> bool:
    from jaxmed.convert import hub
    return hub.relabel(spec.hf_config, len(names), dict(enumerate(names)))


def _placeholder_rest(rest, seed: int):
    """The model's rng streams as small host constants: the step re-derives every key from (seed, step), so
    their values never matter, only their shapes."""
    def leaf(value):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            key = jax.random.key(seed)
            return key if value.shape == () else jax.random.split(key, value.shape)
        return np.zeros(value.shape, value.dtype)

    with jax.default_device(jax.devices("cpu")[0]):
        return jax.tree.map(leaf, rest)


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh), tree, shardings)


def _batch(run: jrun.Run, global_batch: int, labels: bool) -> dict:
    height, width = jdata.pipeline._output_size(run.preprocessor)
    sharding = jmesh.batch_sharding(run.mesh)
    batch = {"image": jax.ShapeDtypeStruct((global_batch, height, width, 3), jnp.uint8, sharding=sharding)}
    if labels:
        batch["label"] = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding)
    return batch


def _check_divisible(key: str, batch: int, mesh, target_name: str) -> None:
    if batch % mesh.size:
        raise JaxmedError(f"{key}={batch} is not divisible by the {mesh.size} devices of {target_name}'s mesh; set "
                          f"--config.{key} to a multiple of {mesh.size} (or use --fit-batch)")


def train_programs(run: jrun.Run, target_name: str, per_device_batch: int | None = None,
                   phases: list[int] | None = None) -> list[Program]:
    """One jitted train step per phase (its optimizer and trainable mask), as `jaxmed.train.loop` builds them."""
    from jaxmed.train.step import make_train_step

    global_batch = per_device_batch * run.mesh.size if per_device_batch else run.config.train.batch_size
    _check_divisible("train.batch_size", global_batch, run.mesh, target_name)
    classes = run.spec.hf_config.num_labels
    class_weights = jnp.ones(classes, jnp.float32) if run.config.train.class_weighted_loss else None
    programs = []
    for index in phases if phases is not None else range(len(run.phases)):
        tx, _ = jrun.optimizer(run, index, run.abstract["params"])
        step = make_train_step(run, tx, class_weights, run.phases[index])
        state = jrun.abstract_state(run, index)
        programs.append(Program(f"train/{run.phases[index].name}", step, (state, _batch(run, global_batch, True)),
                                global_batch // run.mesh.size))
    return programs


def eval_program(run: jrun.Run, target_name: str) -> Program:
    global_batch = run.config.train.eval_batch_size
    _check_divisible("train.eval_batch_size", global_batch, run.mesh, target_name)
    params = _with_sharding(run.abstract["params"], run.shardings["params"])
    stats = _with_sharding(run.abstract["stats"], run.shardings["stats"])
    images = _batch(run, global_batch, False)["image"]
    return Program("eval", jrun.make_eval_step(run), (params, stats, images), global_batch // run.mesh.size)

