"""Optimisers as the HF Trainer builds them (AdamW, decay mask, linear schedule, clipping), plus phases.

A phase is a stretch of training with its own epochs, learning rate and trainable parameters (e.g. head only,
then everything); each phase starts a fresh optimizer, as a new HF Trainer would.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import optax
from flax import nnx

from jaxmed.convert import TABLES
from jaxmed.errors import JaxmedError

# transformers.Trainer.get_decay_parameter_names: no weight decay for these names (matched on HF keys) and for
# anything inside a LayerNorm. BatchNorm weights *are* decayed there, and so here.
HF_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    epochs: float
    lr: float
    trainable: tuple[str, ...] = ()  # regexes searched in parameter paths; empty = every parameter trains
    objective: str = "classification"  # or "reconstruction": the model's reconstruction_loss(pixels, layer)
    layer: int | None = None  # the layer a reconstruction phase pretrains (greedy layer-wise, e.g. the SAE)


OBJECTIVES = ("classification", "reconstruction")
_PHASE_KEYS = ("name", "epochs", "lr", "trainable", "objective", "layer")


def phases(config) -> list[Phase]:
    """`train.phases` (a list of {name, epochs, lr, trainable, objective, layer}), or one phase from train.epochs
    and optim.lr."""
    listed = list(config.train.get("phases", None) or ())
    if not listed:
        return [Phase("train", float(config.train.epochs), float(config.optim.lr),
                      tuple(config.optim.get("trainable", ()) or ()))]
    return [_phase(i, p) for i, p in enumerate(listed)]


def _phase(index: int, entry) -> Phase:
    name = entry.get("name", f"phase{index + 1}")
    where = f"train.phases[{index}] ({name})"
    unknown = sorted(set(entry.keys()) - set(_PHASE_KEYS))
    if unknown:
        raise JaxmedError(f"{where}: unknown key(s) {unknown}; a phase has {', '.join(_PHASE_KEYS)}")
    objective, layer = entry.get("objective", "classification"), entry.get("layer", None)
    if objective not in OBJECTIVES:
        raise JaxmedError(f"{where}: objective={objective!r}; choose {' or '.join(OBJECTIVES)}")
    if objective == "reconstruction" and layer is None:
        raise JaxmedError(f"{where}: a reconstruction phase needs `layer`, the index of the layer it pretrains")
    return Phase(name, float(entry["epochs"]), float(entry["lr"]), tuple(entry.get("trainable", ())), objective,
                 None if layer is None else int(layer))


def dotted(key_path) -> str:
    """A pytree key path as our dotted parameter path; nnx Variables add a `.value` attribute step, dropped."""
    parts = [k for k in key_path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in parts)


def _paths(tree):
    """pytree of dotted parameter paths, same structure as `tree`."""
    return jax.tree_util.tree_map_with_path(lambda key, _: dotted(key), tree)


def decay_mask(params: nnx.State, model_type: str, layernorm_paths: frozenset[str]):
    table = TABLES[model_type][0] if model_type in TABLES else None

    def decays(path: str) -> bool:
        module = path.rpartition(".")[0]
        if module in layernorm_paths:
            return False
        name = table.hf_key(path)[0] if table else path
        return not any(re.search(pattern, name) for pattern in HF_NO_DECAY)

    return jax.tree.map(decays, _paths(params))


def trainable_mask(params: nnx.State, patterns: tuple[str, ...]):
    if not patterns:
        return jax.tree.map(lambda _: True, params)
    mask = jax.tree.map(lambda path: any(re.search(p, path) for p in patterns), _paths(params))
    if not any(jax.tree.leaves(mask)):
        raise JaxmedError(f"trainable patterns {list(patterns)} match no parameter; paths look like "
                          f"{jax.tree.leaves(_paths(params))[:3]}")
    return mask


def schedule(optim_config, lr: float, total_steps: int) -> optax.Schedule:
    """HF's get_{linear,cosine,constant}_schedule_with_warmup, in optimizer updates.

    Warmup as TrainingArguments.get_warmup_steps (transformers 5.23): the ratio's steps rounded up,
    math.ceil(total · ratio) — 50 updates at ratio 0.05 warm up for 3, not round()'s 2."""
    warmup = int(optim_config.warmup_steps or math.ceil(optim_config.warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    kind = optim_config.schedule
    if kind == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise JaxmedError(f"optim.schedule={kind!r}: choose linear, cosine or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim_config, phase: Phase, total_updates: int, params: nnx.State, model_type: str,
                   layernorm_paths: frozenset[str], accumulation: int = 1):
    """(optax transformation, lr schedule) for one phase."""
    lr = schedule(optim_config, phase.lr, total_updates)
    mask = decay_mask(params, model_type, layernorm_paths)
    if optim_config.name == "adamw":
        base = optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay, mask=mask)
    elif optim_config.name == "sgd":
        base = optax.chain(optax.add_decayed_weights(optim_config.weight_decay, mask),
                           optax.sgd(lr, momentum=optim_config.momentum or None, nesterov=optim_config.nesterov))
    else:
        raise JaxmedError(f"optim.name={optim_config.name!r}: choose adamw or sgd")
    chain = [optax.clip_by_global_norm(optim_config.clip_norm)] if optim_config.clip_norm else []
    tx = optax.chain(*chain, base)
    if phase.trainable:
        labels = jax.tree.map(lambda train: "train" if train else "frozen", trainable_mask(params, phase.trainable))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if accumulation > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation)
    return tx, lr


def layernorm_paths(model) -> frozenset[str]:
    return frozenset(".".join(map(str, path)) for path, node in nnx.iter_graph(model)
                     if isinstance(node, nnx.LayerNorm))
