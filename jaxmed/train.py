"""Training, top to bottom: model spec → data → mesh → sharded state → jitted steps → the loop → evaluation.

State is a plain pytree {params, stats, opt, step} sharded over the mesh; the model's graph is split once and
merged inside the jitted steps. Dropout keys derive from (seed, step), so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx, traverse_util

from jaxmed import data as jdata
from jaxmed import mesh as jmesh
from jaxmed import optim
from jaxmed.checkpoint import Checkpoints, workdir_path
from jaxmed.convert import TABLES
from jaxmed.convert import hub
from jaxmed.errors import JaxmedError
from jaxmed.metrics_writer import MetricsWriter, progress_bar

log = logging.getLogger("jaxmed.train")


@dataclasses.dataclass
class ModelSpec:
    """What to build: the HF config (labels set), its preprocessor, and where pretrained weights come from."""

    hf_config: object
    preprocessor: dict
    checkpoint: Path | None
    relabelled: bool = False


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
    return ModelSpec(hf_config, preprocessor, path)


def build_model(spec: ModelSpec, dtype, seed: int):
    from jaxmed.models import MODELS

    _, model_class = MODELS[spec.hf_config.model_type]
    return model_class(spec.hf_config, dtype=dtype, rngs=nnx.Rngs(seed))


def cross_entropy(logits, labels, *, smoothing: float = 0.0, class_weights=None, mask=None):
    """torch CrossEntropyLoss semantics: label smoothing, and a class-weighted mean Σw·l / Σw."""
    logits = logits.astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1])
    targets = optax.smooth_labels(one_hot, smoothing) if smoothing else one_hot
    per_class = class_weights if class_weights is not None else jnp.ones(logits.shape[-1], jnp.float32)
    # torch weights each class's term of the (smoothed) target, and divides by the weights of the true classes
    losses = -jnp.sum(targets * per_class * jax.nn.log_softmax(logits), axis=-1)
    denominators = per_class[labels]
    if mask is not None:
        losses, denominators = losses * mask, denominators * mask
    return jnp.sum(losses) / jnp.maximum(jnp.sum(denominators), 1e-12)


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
    steps_per_epoch: int
    phases: list
    phase_steps: list  # global step at which each phase ends


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
    train_split = dataset.splits["train"]
    steps_per_epoch = jdata.steps_per_epoch(train_split, config.train.batch_size)
    if config.train.steps:
        plan = [dataclasses.replace(plan[0], epochs=config.train.steps / steps_per_epoch)]
    ends, total = [], 0
    for phase in plan:
        total += max(1, round(phase.epochs * steps_per_epoch))
        ends.append(total)
    rest = jax.jit(lambda: _split(build_model(spec, dtype, config.seed))[3],
                   out_shardings=jmesh.replicated(mesh))()
    return Run(config, workdir, spec, dataset, preprocessor, mesh, graph_train, graph_eval, rest, shardings,
               {"params": params, "stats": stats}, layernorms, steps_per_epoch, plan, ends)


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
    accumulation = run.config.train.grad_accumulation
    updates = max(1, (run.phase_steps[index] - start) // accumulation)
    return optim.make_optimizer(run.config.optim, run.phases[index], updates, params,
                                run.spec.hf_config.model_type, run.layernorms, accumulation)


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
    return _with_optimizer(run, phase, params, stats, step=0)


def _with_optimizer(run: Run, phase: int, params, stats, step: int):
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


def reseeded(rest, key):
    """The model's rng streams with keys derived from `key` (one per stream): dropout masks depend on the step
    alone, so a resumed run draws exactly what an uninterrupted run would."""
    leaves, treedef = jax.tree.flatten(rest)
    leaves = [jax.random.fold_in(key, i) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
              for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


def step_function(graph, rest, tx, normalize, *, seed: int, label_smoothing: float = 0.0, class_weights=None,
                  objective: str = "classification", layer: int | None = None):
    """The pure train step {params, stats, opt, step}, batch → (state, metrics); jit it with shardings.

    objective "reconstruction" minimises `model.reconstruction_loss(pixels, layer)` (greedy layer-wise
    pretraining) instead of the cross-entropy, and reports no accuracy.
    """
    base_key = jax.random.key(seed)

    def train_step(state, batch):
        step_rest = reseeded(rest, jax.random.fold_in(base_key, state["step"]))

        def loss_fn(params, stats, step_rest):
            # copy=True: fresh Variables of this trace, so dropout counters and BatchNorm statistics may update
            model = nnx.merge(graph, params, stats, step_rest, copy=True)
            pixels = normalize(batch["image"])
            if objective == "reconstruction":
                return model.reconstruction_loss(pixels, layer), ({}, nnx.state(model, nnx.BatchStat))
            logits = model(pixels)
            loss = cross_entropy(logits, batch["label"], smoothing=label_smoothing, class_weights=class_weights)
            accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
            return loss, ({"accuracy": accuracy}, nnx.state(model, nnx.BatchStat))

        (loss, (extra, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["stats"], step_rest)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **extra, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "stats": stats, "opt": opt, "step": state["step"] + 1}, metrics

    return train_step


def make_train_step(run: Run, tx, class_weights, phase: optim.Phase):
    train_step = step_function(run.graph_train, run.rest, tx,
                               lambda images: jdata.model_inputs(images, run.preprocessor), seed=run.config.seed,
                               label_smoothing=run.config.train.label_smoothing, class_weights=class_weights,
                               objective=phase.objective, layer=phase.layer)
    state_shardings = {"params": run.shardings["params"], "stats": run.shardings["stats"],
                       "opt": jmesh.tree_shardings(run.mesh, jax.eval_shape(tx.init, run.abstract["params"])),
                       "step": jmesh.replicated(run.mesh)}
    return jax.jit(train_step, in_shardings=(state_shardings, jmesh.batch_sharding(run.mesh)),
                   out_shardings=(state_shardings, jmesh.replicated(run.mesh)), donate_argnums=0)


def make_eval_step(run: Run):
    graph, rest = run.graph_eval, run.rest

    def eval_step(params, stats, images):
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


def validation_metrics(labels: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict:
    """What the best checkpoint can be chosen by: accuracy, loss, balanced accuracy, F1, recall/<class>."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    predictions = logits.argmax(-1)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits))
    loss = float(-jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(labels)[:, None], 1)))
    return {"accuracy": float(np.mean(predictions == labels)), "loss": loss,
            "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
            "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(labels, predictions, average="weighted", zero_division=0)),
            **{f"recall/{name}": float(value) for name, value in zip(class_names, recall_score(
                labels, predictions, labels=list(range(len(class_names))), average=None, zero_division=0))}}


class _Preemption:
    """SIGTERM (spot VM reclaimed, scheduler eviction) → save at the next step and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:  # multi-host: jax.distributed's preemption notifier + orbax sync instead
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir) -> dict:
    """Train (resuming from W/checkpoints when present), keep the best by validation, evaluate it on test."""
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = setup(config, workdir)
    tc = config.train
    checkpoints = Checkpoints(workdir, keep_best=tc.keep_best, best_metric=tc.best_metric, best_mode=tc.best_mode,
                              async_saves=tc.async_checkpoints)
    train_split = run.dataset.splits["train"]
    val_split = run.dataset.splits.get("val")
    if val_split is not None and tc.best_metric not in validation_metrics(
            val_split.labels[:2], np.zeros((2, len(run.dataset.class_names))), run.dataset.class_names):
        raise JaxmedError(f"train.best_metric={tc.best_metric!r} is not a validation metric; choose accuracy, loss, "
                          f"balanced_accuracy, f1_macro, f1_weighted or recall/<class> with a class of "
                          f"{run.dataset.class_names}")
    iterator = jdata.host_train_iterator(
        train_split, run.preprocessor, batch_size=tc.batch_size, shards=config.data.shards or jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
        augment_settings=config.data.augment, balanced=config.data.balanced_sampling,
        num_workers=config.data.num_workers)
    class_weights = (jnp.asarray(jdata.class_weights(train_split.labels, len(run.dataset.class_names)))
                     if tc.class_weighted_loss else None)
    meta = {"class_names": run.dataset.class_names, "model_type": run.spec.hf_config.model_type,
            "hf_config": run.spec.hf_config.to_dict(), "preprocessor": run.spec.preprocessor,
            "config": json.loads(config.to_json_best_effort())}
    start = checkpoints.latest_step()
    if start is not None:
        # the phase that wrote the checkpoint: one saved at a phase's last step holds that phase's optimizer state
        # (the loop then starts the next phase's fresh optimizer)
        phase = phase_index(run, max(start - 1, 0))
        state, _ = checkpoints.restore_latest(start, abstract_state(run, phase), iterator)
        log.info("resuming from step %d (%s/checkpoints/%d)", start, workdir, start)
    else:
        phase, start = 0, 0
        state = init_state(run, phase)
    total = run.phase_steps[-1]
    writer = MetricsWriter(workdir)
    tx, lr = optimizer(run, phase, state["params"])
    train_step = make_train_step(run, tx, class_weights, run.phases[phase])
    eval_step = make_eval_step(run)
    eval_every = tc.eval_every_steps or run.steps_per_epoch
    best, stale, history = None, 0, []
    sharding = jmesh.batch_sharding(run.mesh)
    bar = progress_bar(total, start)
    step, started, pending = start, time.perf_counter(), []
    with _Preemption() as preemption:
        while step < total:
            if phase_index(run, step) != phase:  # a new phase starts a fresh optimizer, as a new HF Trainer
                if pending:  # log the last phase's steps under its own objective and learning rate
                    _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator, meta)
                    started, pending = time.perf_counter(), []
                phase = phase_index(run, step)
                log.info("phase %s from step %d", run.phases[phase].name, step)
                state = _with_optimizer(run, phase, state["params"], state["stats"], step)
                tx, lr = optimizer(run, phase, state["params"])
                train_step = make_train_step(run, tx, class_weights, run.phases[phase])
            batch = next(iterator)
            batch = jmesh.global_batch({"image": batch["image"], "label": batch["label"]}, sharding)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append(metrics)
            if step % tc.log_every_steps == 0 or step == total:
                _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator, meta)
                started, pending = time.perf_counter(), []
            if val_split is not None and (step % eval_every == 0 or step == total):
                indices, logits = predict(run, eval_step, state["params"], state["stats"], val_split)
                metrics = validation_metrics(val_split.labels[indices], logits, run.dataset.class_names)
                writer.write(step, {f"val/{k}": v for k, v in metrics.items()})
                history.append({"step": step, **metrics})
                bar.write(f"step {step}: val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                         if not k.startswith("recall/")))
                # in a reconstruction (pretraining) phase the head is untrained: its metrics choose no checkpoint
                if run.phases[phase].objective == "classification":
                    checkpoints.save_best(step, {"params": state["params"], "stats": state["stats"]},
                                          dict(meta, step=step, val=metrics), metrics)
                    value = metrics[tc.best_metric] * (1 if tc.best_mode == "max" else -1)
                    best, stale = (value, 0) if best is None or value > best else (best, stale + 1)
                if tc.early_stopping_patience and stale >= tc.early_stopping_patience:
                    log.info("early stopping at step %d: no better %s for %d evaluations", step, tc.best_metric,
                             stale)
                    checkpoints.save_latest(step, state, iterator, dict(meta, step=step), force=True)
                    break
            if step % run.steps_per_epoch == 0 or step == total:
                checkpoints.save_latest(step, state, iterator, dict(meta, step=step))
            if preemption.requested or (jax.process_count() > 1 and checkpoints.reached_preemption(step)):
                checkpoints.save_latest(step, state, iterator, dict(meta, step=step), force=True)
                checkpoints.close()
                bar.close()
                print(f"preempted at step {step}: saved {workdir}/checkpoints/{step}; run the same command "
                      "again to resume", flush=True)
                return {"preempted_at": step}
    bar.close()
    checkpoints.wait()
    result = {"steps": step, "history": history}
    if tc.evaluate_test and "test" in run.dataset.splits:
        from jaxmed import evaluate

        result["test"] = evaluate.evaluate_run(run, checkpoints, eval_step, "test")
    checkpoints.close()
    writer.close()
    return result


def _flush(run, writer, bar, pending, step, started, lr, phase, checkpoints, state, iterator, meta):
    values = jax.device_get(pending)
    losses = np.array([v["loss"] for v in values])
    if not np.all(np.isfinite(losses)):
        bad = step - len(values) + int(np.argmin(np.isfinite(losses)))
        checkpoints.save_latest(step, state, iterator, dict(meta, step=step, nonfinite_at=bad), force=True)
        checkpoints.close()
        raise JaxmedError(f"loss became {losses[~np.isfinite(losses)][0]} at step {bad + 1}; saved step {step} in "
                          f"{run.workdir}/checkpoints for inspection — lower optim.lr or enable optim.clip_norm")
    images_per_second = len(values) * run.config.train.batch_size / max(time.perf_counter() - started, 1e-9)
    current_lr = float(lr(max(0, (step - (run.phase_steps[phase - 1] if phase else 0)) //
                              run.config.train.grad_accumulation - 1)))
    # a reconstruction phase's loss is an MSE: its own curve, not a stretch of the cross-entropy's
    loss_name = "train/loss" if run.phases[phase].objective == "classification" else "train/reconstruction_loss"
    summary = {loss_name: float(losses.mean()), "train/grad_norm": float(np.mean([v["grad_norm"] for v in values])),
               "train/lr": current_lr, "train/images_per_second": images_per_second,
               "train/epoch": step / run.steps_per_epoch}
    if "accuracy" in values[0]:
        summary["train/accuracy"] = float(np.mean([v["accuracy"] for v in values]))
    writer.write(step, summary)
    bar.update(len(values))
    bar.set_postfix(loss=f"{summary[loss_name]:.4f}", lr=f"{current_lr:.2e}", img_s=f"{images_per_second:.1f}")
