"""The pure training step and its jitted, sharded form.

Dropout keys derive from (seed, step), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmed import data as jdata
from jaxmed.models import kernels
from jaxmed.train import mesh as jmesh
from jaxmed.train import optim
from jaxmed.train.run import Run


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
            # an epoch's last, partial batch comes padded to the full shape: the mean is over its real images, as
            # the HF Trainer's shorter last batch gives it (BatchNorm's batch statistics still see the padding,
            # copies of the epoch's first images)
            mask = batch["mask"].astype(jnp.float32) if "mask" in batch else None
            loss = cross_entropy(logits, batch["label"], smoothing=label_smoothing, class_weights=class_weights,
                                 mask=mask)
            correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
            accuracy = jnp.mean(correct) if mask is None else jnp.sum(correct * mask) / jnp.maximum(mask.sum(), 1)
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

    def sharded_step(state, batch):
        with kernels.batch_mesh(run.mesh):  # the TPU's Pallas attention runs per device over the batch
            return train_step(state, batch)

    return jax.jit(sharded_step, in_shardings=(state_shardings, jmesh.batch_sharding(run.mesh)),
                   out_shardings=(state_shardings, jmesh.replicated(run.mesh)), donate_argnums=0)
