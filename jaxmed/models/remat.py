"""Rematerialisation (`model.remat`): trade compute for activation memory by recomputing a block's insides in the
backward pass instead of keeping them from the forward pass."""

from __future__ import annotations

import jax
from flax import nnx

from jaxmed.errors import JaxmedError

# none: keep every activation. blocks: keep the outputs of the matmuls without batch dimensions (the linear layers)
# and recompute the rest of each transformer block / residual stage (norms, activations, attention scores, convs).
# full: keep only each block's input and recompute all of it.
POLICIES = {"blocks": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            "full": jax.checkpoint_policies.nothing_saveable}
MODES = ("none", *POLICIES)


def check(mode: str) -> str:
    if mode not in MODES:
        raise JaxmedError(f"model.remat={mode!r}; choose one of {', '.join(MODES)}")
    return mode


def call(mode: str, block, x, *static):
    """`block(x, *static)`, checkpointed by `mode` (the model's `remat` attribute) unless it is "none"."""
    if mode == "none":
        return block(x, *static)
    return nnx.remat(lambda module, inputs: module(inputs, *static), policy=POLICIES[mode])(block, x)
