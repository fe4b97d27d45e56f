"""The shared run set-up: model spec, data, mesh and the sharded (abstract) state, built once from a config, and
the jitted eval step that predicts a split. Training, evaluation, prediction and cross-validation all start here.

State is a plain pytree {params, stats, opt, step} sharded over the mesh; the model's graph is split once and
merged inside the jitted steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from jaxmed import data as jdata
from jaxmed.convert import TABLES, hub
from jaxmed.errors import JaxmedError
from jaxmed.models import kernels
from jaxmed.train import mesh as jmesh
from jaxmed.train import optim


@dataclasses.dataclass
class ModelSpec:
    """What to build: the HF config (labels set), its preprocessor, and where pretrained weights come from."""

    hf_config: object
    preprocessor: dict
    checkpoint: Path | None
    relabelled: bool = False
    remat: str = "none"  # model.remat (jaxmed.models.remat)


def model_spec(config) -> ModelSpec:
    from jaxmed.models import MODELS

    if config.model.init_from:
        path = hub.resolve(config.model.init_from)
        hf_config = hub.read_config(path)
        preprocessor = hub.read_preprocessor(path, hf_config.model_type)
    else:
        if config.model.name not in MODELS:
            raise JaxmedError(f"model.name={config.model.name!r} is not a jaxmed model; choose one of "
                              f"{', '.join(sorted(MODELS))}")
        config_class, _ = MODELS[config.model.name]
        hf_config = config_class(**config.model.hf_config.to_dict())
        preprocessor = dict(TABLES[hf_config.model_type][1])
        path = None
    preprocessor.update(config.model.preprocessor.to_dict())
    return ModelSpec(hf_config, preprocessor, path, remat=_remat(config))


def _remat(config) -> str:
    from jaxmed.models import remat

    return remat.check(config.model.get("remat", "none"))


def build_model(spec: ModelSpec, dtype, seed: int):
    from jaxmed.models import MODELS

    _, model_class = MODELS[spec.hf_config.model_type]
    model = model_class(spec.hf_config, dtype=dtype, rngs=nnx.Rngs(seed))
    if spec.remat != "none":
        model.remat = spec.remat
    return model


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    config: object
    workdir: epath.Path  # local or gs://
    spec: ModelSpec
    dataset: jdata.Dataset
    preprocessor: jdata.Preprocessor
    mesh: jax.sharding.Mesh
    graph_train: object
    graph_eval: object
    rest: object  # the model's non-parameter, non-statistics state (rng streams), replicated
    shardings: dict
    abstract: dict  # {"params", "stats"}: ShapeDtypeStructs of the weights
    layernorms: frozenset
    steps_per_epoch: int  # optimizer updates (a step is an update: train.grad_accumulation micro-batches)
    phases: list
    phase_steps: list  # global step at which each phase ends
    budget: str = ""  # how many steps, and why (logged when training starts)


def _split(model):
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def setup(config, workdir) -> Run:
    spec = model_spec(config)
    preprocessor = jdata.Preprocessor.from_config(spec.preprocessor)
    dataset = jdata.load_dataset(config.data, preprocessor)
    names = dataset.class_names
    spec.relabelled = hub.relabel(spec.hf_config, len(names), {i: n for i, n in enumerate(names)})
    mesh = jmesh.make_mesh(config.mesh.data, config.mesh.fsdp)
    if config.train.batch_size % (mesh.size // jax.process_count() * jax.process_count()):
        raise JaxmedError(f"train.batch_size={config.train.batch_size} must be divisible by the {mesh.size} devices")
    dtype = jnp.dtype(config.model.dtype)
    abstract = nnx.eval_shape(lambda: build_model(spec, dtype, config.seed))
    plan = optim.phases(config)
    _check_reconstruction_phases(plan, abstract, spec.hf_config.model_type)
    layernorms = optim.layernorm_paths(abstract)
    abstract.eval()
    graph_eval, *_ = _split(abstract)
    abstract.train()
    graph_train, params, stats, rest = _split(abstract)
    shardings = {"params": jmesh.tree_shardings(mesh, params), "stats": jmesh.tree_shardings(mesh, stats)}
    micro_batches = jdata.steps_per_epoch(dataset.splits["train"], config.train.batch_size,
                                          shards=config.data.shards or jax.process_count(),
                                          drop_last=config.train.drop_last)
    # the HF Trainer's num_update_steps_per_epoch: ceil(batches / gradient_accumulation_steps)
    steps_per_epoch = math.ceil(micro_batches / config.train.grad_accumulation)
    plan, budget = training_budget(plan, steps_per_epoch, config.train)
    ends = list(itertools.accumulate(phase_updates(phase, steps_per_epoch) for phase in plan))
    rest = jax.jit(lambda: _split(build_model(spec, dtype, config.seed))[3],
                   out_shardings=jmesh.replicated(mesh))()
    return Run(config, workdir, spec, dataset, preprocessor, mesh, graph_train, graph_eval, rest, shardings,
               {"params": params, "stats": stats}, layernorms, steps_per_epoch, plan, ends, budget)


def phase_updates(phase, steps_per_epoch: int) -> int:
    """A phase's optimizer updates, as the HF Trainer's max_steps = math.ceil(num_train_epochs ·
    num_update_steps_per_epoch) (rounded first, so that 8/3 epochs of 3 updates are 8, not 9)."""
    return max(1, math.ceil(round(phase.epochs * steps_per_epoch, 6)))


def steps_over_phases(plan: list, steps: int, steps_per_epoch: int) -> tuple[list, str]:
    """`train.steps` shared over the phases by their epochs (cumulative rounding, at least one each), so a short run
    of a phased protocol still runs every phase; fewer steps than phases is an error, not a phase dropped."""
    if steps < len(plan):
        raise JaxmedError(f"train.steps={steps} is fewer than the {len(plan)} phases "
                          f"({', '.join(phase.name for phase in plan)}): give each phase at least one step")
    epochs = [phase.epochs for phase in plan]
    ends, previous = [], 0
    for index, cumulative in enumerate(itertools.accumulate(epochs)):
        end = round(steps * cumulative / sum(epochs))
        end = min(max(end, previous + 1), steps - (len(plan) - 1 - index))
        ends.append(end)
        previous = end
    counts = [end - start for start, end in zip([0] + ends, ends)]
    shared = [dataclasses.replace(phase, epochs=count / steps_per_epoch) for phase, count in zip(plan, counts)]
    if len(plan) == 1:
        return shared, f"train.steps={steps} steps"
    return shared, (f"train.steps={steps} steps over the phases by their epochs ("
                    + ", ".join(f"{phase.name} {count}" for phase, count in zip(plan, counts)) + ")")


def training_budget(plan: list, steps_per_epoch: int, train_config) -> tuple[list, str]:
    """The phases stretched to at least `train.min_steps` optimiser steps (or fitted to `train.steps`), and a
    sentence saying why the budget is what it is. A small dataset's epochs are a handful of steps, too few to learn
    from scratch: then the steps count, not the epochs (early stopping on val ends the run once it stops
    improving). Every count here is of optimizer updates, as the HF Trainer's max_steps."""
    stopping = (f"; stopping a phase early after {train_config.early_stopping_patience} validations without a "
                f"better {train_config.best_metric}" if train_config.early_stopping_patience else "")
    if train_config.steps:
        plan, budget = steps_over_phases(plan, train_config.steps, steps_per_epoch)
        return plan, budget + stopping
    steps = sum(phase_updates(phase, steps_per_epoch) for phase in plan)
    epochs = sum(phase.epochs for phase in plan)
    budget = (f"{epochs:g} epochs of {steps_per_epoch} steps (batch {train_config.batch_size}) = {steps} steps")
    minimum = train_config.min_steps
    if minimum and steps < minimum:
        scale = minimum / steps
        plan = [dataclasses.replace(phase, epochs=phase.epochs * scale) for phase in plan]
        budget += (f", fewer than train.min_steps={minimum}: training {minimum} steps "
                   f"({epochs * scale:.1f} epochs) instead")
    return plan, budget + stopping


def _check_reconstruction_phases(plan, model, model_type: str) -> None:
    """Before any training: a bad layer would otherwise surface only when its phase starts, maybe hours in."""
    layers = getattr(model, "reconstruction_layers", 0)  # models with a reconstruction_loss(pixels, layer)
    for phase in plan:
        if phase.objective != "reconstruction":
            continue
        if not layers:
            raise JaxmedError(f"phase {phase.name} has objective 'reconstruction' but a {model_type} model has no "
                              "reconstruction loss; only the stacked autoencoder (model.name='jaxmed_sae') has one")
        if not 0 <= phase.layer < layers:
            raise JaxmedError(f"phase {phase.name} pretrains layer {phase.layer}, but the {model_type} model has "
                              f"layers 0..{layers - 1}")


def phase_index(run: Run, step: int) -> int:
    return next((i for i, end in enumerate(run.phase_steps) if step < end), len(run.phase_steps) - 1)


def optimizer(run: Run, index: int, params):
    start = run.phase_steps[index - 1] if index else 0
    return optim.make_optimizer(run.config.optim, run.phases[index], run.phase_steps[index] - start, params,
                                run.spec.hf_config.model_type, run.layernorms, run.config.train.grad_accumulation)


def init_state(run: Run, phase: int):
    """Parameters created already sharded (eval_shape → shardings → jit(init)); pretrained weights go straight
    into that layout, each host filling only its own shards from the checkpoint file."""
    config, dtype = run.config, jnp.dtype(run.config.model.dtype)

    def init_weights():
        _, params, stats, _ = _split(build_model(run.spec, dtype, config.seed))
        return params, stats

    params, stats = jax.jit(init_weights, out_shardings=(run.shardings["params"], run.shardings["stats"]))()
    if run.spec.checkpoint is not None:
        params, stats = _load_pretrained(run, params, stats)
    return with_optimizer(run, phase, params, stats, step=0)


def with_optimizer(run: Run, phase: int, params, stats, step: int):
    tx, _ = optimizer(run, phase, params)
    opt_shardings = jmesh.tree_shardings(run.mesh, jax.eval_shape(tx.init, params))
    opt = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return {"params": params, "stats": stats, "opt": opt,
            "step": jax.device_put(jnp.asarray(step, jnp.int32), jmesh.replicated(run.mesh))}


def _load_pretrained(run: Run, params, stats):
    tensors = hub.load_state_dict(run.spec.checkpoint)
    groups = {name: traverse_util.flatten_dict(nnx.to_pure_dict(group))
              for name, group in (("params", params), ("stats", stats))}
    expected = {_dotted(key): (leaf.shape, leaf.dtype) for flat in groups.values() for key, leaf in flat.items()}
    values = hub.convert_checkpoint(tensors, expected, run.spec.hf_config.model_type,
                                    num_labels=run.spec.hf_config.num_labels, allow_head_mismatch=run.spec.relabelled)

    def place(key, array):
        value = values.get(_dotted(key))
        if value is None:  # a re-initialised head keeps its fresh, sharded init
            return array
        return jax.make_array_from_callback(array.shape, array.sharding, lambda index: value[index])

    for name, group in (("params", params), ("stats", stats)):
        nnx.replace_by_pure_dict(group, traverse_util.unflatten_dict(
            {key: place(key, leaf) for key, leaf in groups[name].items()}))
    return params, stats


def _dotted(key: tuple) -> str:
    return ".".join(str(part) for part in key)


def abstract_state(run: Run, phase: int) -> dict:
    """Shapes, dtypes and shardings of the train state, for restoring without materialising anything."""
    def sharded(tree):
        shardings = jmesh.tree_shardings(run.mesh, tree)
        return jax.tree.map(lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh), tree,
                            shardings)

    tx, _ = optimizer(run, phase, run.abstract["params"])
    return {"params": sharded(run.abstract["params"]), "stats": sharded(run.abstract["stats"]),
            "opt": sharded(jax.eval_shape(tx.init, run.abstract["params"])),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=jmesh.replicated(run.mesh))}


def make_eval_step(run: Run):
    graph, rest = run.graph_eval, run.rest

    def eval_step(params, stats, images):
        with kernels.batch_mesh(run.mesh):
            model = nnx.merge(graph, params, stats, rest)
            return model(jdata.model_inputs(images, run.preprocessor)).astype(jnp.float32)

    return jax.jit(eval_step, in_shardings=(run.shardings["params"], run.shardings["stats"],
                                            jmesh.batch_sharding(run.mesh)),
                   out_shardings=jmesh.replicated(run.mesh))


def predict(run: Run, eval_step, params, stats, split) -> tuple[np.ndarray, np.ndarray]:
    """(indices, logits) of every example of `split`, each exactly once, gathered from all hosts."""
    sharding = jmesh.batch_sharding(run.mesh)
    indices, logits = [], []
    for batch in jdata.eval_batches(split, run.preprocessor, batch_size=run.config.train.eval_batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count()):
        images = jax.make_array_from_process_local_data(sharding, batch["image"])
        index = jax.make_array_from_process_local_data(sharding, batch["index"])
        out = eval_step(params, stats, images)
        gathered = np.asarray(jax.jit(lambda x: x, out_shardings=jmesh.replicated(run.mesh))(index))
        keep = gathered >= 0
        indices.append(gathered[keep])
        logits.append(np.asarray(out)[keep])
    indices, logits = np.concatenate(indices), np.concatenate(logits)
    order = np.argsort(indices)
    return indices[order], logits[order]


def make_features_step(run: Run):
    """eval_step's logits with the pooled features the classifier reads: what the OOD detectors are fitted on."""
    graph, rest = run.graph_eval, run.rest

    def features_step(params, stats, images):
        with kernels.batch_mesh(run.mesh):
            output = nnx.merge(graph, params, stats, rest).forward(jdata.model_inputs(images, run.preprocessor))
        return output.features.astype(jnp.float32), output.logits.astype(jnp.float32)

    replicated = jmesh.replicated(run.mesh)
    return jax.jit(features_step, in_shardings=(run.shardings["params"], run.shardings["stats"],
                                                jmesh.batch_sharding(run.mesh)),
                   out_shardings=(replicated, replicated))


def predict_features(run: Run, features_step, params, stats, split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, features, logits) of every example of `split`, each once, in index order (as `predict`)."""
    sharding = jmesh.batch_sharding(run.mesh)
    indices, features, logits = [], [], []
    for batch in jdata.eval_batches(split, run.preprocessor, batch_size=run.config.train.eval_batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count()):
        images = jax.make_array_from_process_local_data(sharding, batch["image"])
        index = jax.make_array_from_process_local_data(sharding, batch["index"])
        batch_features, batch_logits = features_step(params, stats, images)
        gathered = np.asarray(jax.jit(lambda x: x, out_shardings=jmesh.replicated(run.mesh))(index))
        keep = gathered >= 0
        indices.append(gathered[keep])
        features.append(np.asarray(batch_features)[keep])
        logits.append(np.asarray(batch_logits)[keep])
    indices = np.concatenate(indices)
    order = np.argsort(indices)
    return indices[order], np.concatenate(features)[order], np.concatenate(logits)[order]


def place_weights(run: Run, flat: dict) -> tuple:
    """{dotted path: array} (a checkpoint's host copy) → the run's (params, stats) states, each leaf on its shards."""
    def state(name):
        tree = jax.tree_util.tree_map_with_path(lambda path, _: flat[optim.dotted(path)], run.abstract[name])
        return jax.device_put(tree, run.shardings[name])

    return state("params"), state("stats")
