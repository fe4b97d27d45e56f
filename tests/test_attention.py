"""layers.attention: the composition's forward, and a hand-written backward that matches its autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmed.models import layers

SHAPE = (2, 3, 17, 8), (2, 3, 6, 8)  # queries (B, heads, T, D); keys/values (B, heads, S, D): CvT's strided kv


def _composed(q, k, v, scale):
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * scale
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.matmul(weights, v), weights


def _inputs(dtype=jnp.float32):
    rng = np.random.RandomState(0)
    return tuple(jnp.asarray(rng.randn(*shape), dtype) for shape in (SHAPE[0], SHAPE[1], SHAPE[1]))


def test_forward_is_the_composition_bit_for_bit():
    q, k, v = _inputs()
    for ours, theirs in zip(layers.attention(q, k, v, 0.3), _composed(q, k, v, 0.3)):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("uses_weights", [False, True])
def test_gradient_matches_autodiff(uses_weights):
    q, k, v = _inputs()
    rng = np.random.RandomState(1)
    w_context = jnp.asarray(rng.randn(*SHAPE[0]), jnp.float32)
    w_weights = jnp.asarray(rng.randn(2, 3, 17, 6), jnp.float32) if uses_weights else 0.0

    def loss(fn):
        def f(q, k, v):
            context, weights = fn(q, k, v, 0.3)
            return jnp.sum(jnp.sin(context) * w_context) + jnp.sum(weights * w_weights)
        return jax.grad(f, (0, 1, 2))

    for ours, theirs in zip(loss(layers.attention)(q, k, v), loss(_composed)(q, k, v)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bf16_gradient_close_to_fp32_and_in_bf16():
    q, k, v = _inputs()
    grad = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, 0.3)[0])), (0, 1, 2))
    full = grad(q, k, v)
    mixed = grad(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
    for m, f in zip(mixed, full):
        assert m.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(m, np.float32), f, rtol=0, atol=0.05 * float(jnp.abs(f).max()))


def test_active_dropout_composes_the_ops_and_drops_weights():
    q, k, v = _inputs()
    context, weights = layers.attention(q, k, v, 0.3, nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    kept = nnx.Dropout(0.5, rngs=nnx.Rngs(0))(weights)  # the same mask, from the same key
    assert 0.3 < float(jnp.mean(kept == 0)) < 0.7
    np.testing.assert_allclose(context, jnp.matmul(kept, v), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(weights, _composed(q, k, v, 0.3)[1])
    inactive = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    inactive.eval()
    np.testing.assert_array_equal(layers.attention(q, k, v, 0.3, inactive)[0], _composed(q, k, v, 0.3)[0])
