"""layers.materialize: an exact identity, forward and backward, that stays in the compiled CPU program."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models.layers import materialize


def test_identity_forward_and_backward_bit_exact():
    x = jnp.asarray(np.random.RandomState(0).randn(4, 5, 6).astype(np.float32))
    w = jnp.asarray(np.random.RandomState(1).randn(4, 5, 6).astype(np.float32))
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(materialize(v * 3.0)) * w)))(x)
    np.testing.assert_array_equal(grad, jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(v * 3.0) * w)))(x))


def test_fence_survives_compilation_both_ways():
    """XLA:CPU folds optimization_barrier away before fusion; the fence is a conditional, which it keeps."""
    program = jax.jit(jax.grad(lambda v: jnp.sum(jnp.tanh(materialize(jnp.tanh(v)))))).lower(jnp.ones((8, 16)))
    assert program.compile().as_text().count("conditional(") == 2  # one forward, one for the cotangent


def test_nan_passes_through():
    x = jnp.asarray([np.nan, 1.0, -2.0], jnp.float32)
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
