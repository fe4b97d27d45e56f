"""Rematerialisation (`model.remat`): trade compute for activation memory by recomputing a block's insides in the
backward pass instead of keeping them from the forward pass."""

from __future__ import annotations

import jax
from flax import nnx

from jaxmed.errors import JaxmedError
from jaxmed.models import layers

# none: keep every activation. blocks: keep each attention's q, k and v (token-major, in the compute dtype: the
# outputs of its query/key/value projections, named by `layers.split_heads`, as MaxText's `save_qkv_proj`) and
# recompute the rest of each transformer block (norms, the MLP, attention itself); blocks without attention (CNN
# stages) keep only their input, as full does. full: keep only each block's input and recompute all of it.
# Why not keep every matmul output: a ViT-B/16 block's linear outputs hold 9x its input's values, in mixed
# precision as fp32 — 65 MB per image over 12 blocks, more than `none` keeps after XLA's own choices (README,
# "model.remat").
POLICIES = {"blocks": jax.checkpoint_policies.save_only_these_names(layers.ATTENTION_INPUT),
            "full": jax.checkpoint_policies.nothing_saveable}
MODES = ("none", *POLICIES)


def check(mode: str) -> str:
    if mode not in MODES:
        raise JaxmedError(f"model.remat={mode!r}; choose one of {', '.join(MODES)}")
    return mode


def call(mode: str, block, x, *static):
    """`block(x, *static)`, checkpointed by `mode` (the model's `remat` attribute) unless it is "none".

    The block runs as a pure function of its state inside `jax.checkpoint` (fresh Variables there), and its
    updated state (dropout counters, BatchNorm statistics) is written back outside. A block in eval mode runs
    plainly: the eval step merges the model without copies, whose Variables must not be written from its trace."""
    if mode == "none" or not _training(block):  # no backward pass to save memory for (eval, predict)
        return block(x, *static)
    graph, state = nnx.split(block)

    def pure(state, inputs):
        module = nnx.merge(graph, state, copy=True)
        return module(inputs, *static), nnx.state(module)

    out, state = jax.checkpoint(pure, policy=POLICIES[mode])(state, x)
    nnx.update(block, state)
    return out


def _training(block) -> bool:
    """Whether `block` is in training mode: an active dropout or BatchNorm updating its statistics inside."""
    return any(getattr(node, "deterministic", None) is False or getattr(node, "use_running_average", None) is False
               for _, node in nnx.iter_graph(block))
