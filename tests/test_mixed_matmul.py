"""layers.matmul / layers.dot_general: fp32 is untouched; bf16 accumulates in fp32 and multiplies in bf16 backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import ViTConfig

from jaxmed.models import layers
from jaxmed.models.vit import ViT

SHAPES = [((4, 5, 24), (24, 16)), ((2, 3, 7, 24), (2, 3, 24, 9))]  # a Linear's weight; attention's batched matmul


def _operands(a_shape, b_shape, dtype):
    rng = np.random.RandomState(0)
    return (jnp.asarray(rng.randn(*a_shape), dtype), jnp.asarray(rng.randn(*b_shape), dtype))


@pytest.mark.parametrize("a_shape,b_shape", SHAPES)
def test_fp32_is_plain_matmul_bit_for_bit(a_shape, b_shape):
    a, b = _operands(a_shape, b_shape, jnp.float32)
    np.testing.assert_array_equal(layers.matmul(a, b), jnp.matmul(a, b))
    ours = jax.grad(lambda a, b: jnp.sum(jnp.sin(layers.matmul(a, b))), (0, 1))(a, b)
    plain = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.matmul(a, b))), (0, 1))(a, b)
    for x, y in zip(ours, plain):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("a_shape,b_shape", SHAPES)
def test_bf16_accumulates_in_fp32_and_differentiates_like_fp32(a_shape, b_shape):
    a, b = _operands(a_shape, b_shape, jnp.bfloat16)
    out = layers.matmul(a, b)
    assert out.dtype == jnp.float32
    exact = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)

    weights = jnp.asarray(np.random.RandomState(1).randn(*out.shape), jnp.float32)
    ours = jax.grad(lambda a, b: jnp.sum(layers.matmul(a, b) * weights), (0, 1))(a, b)
    # Reference: fp32 autodiff on the same bf16 values, with the cotangent rounded to bf16 as ours multiplies it.
    g = weights.astype(jnp.bfloat16).astype(jnp.float32)
    reference = jax.grad(lambda a, b: jnp.sum(jnp.matmul(a, b) * g), (0, 1))(a.astype(jnp.float32),
                                                                                 b.astype(jnp.float32))
    for x, y in zip(ours, reference):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(x, np.float32), y, rtol=1e-2, atol=1e-2 * float(jnp.abs(y).max()))


def test_bf16_backward_multiplies_bf16_operands():
    """The point of the custom VJP: no dot in the gradient takes an fp32 (upcast) operand."""
    a, b = _operands(*SHAPES[0], jnp.bfloat16)
    text = jax.jit(jax.grad(lambda a, b: jnp.sum(layers.matmul(a, b) ** 2), (0, 1))).lower(a, b).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3  # forward, and one per operand's gradient
    for line in dots:
        operand_types = line.rsplit(":", 1)[1].split("->")[0]
        assert "f32" not in operand_types and "bf16" in operand_types, line


def test_dot_general_routes_only_a_linear_contraction():
    a, b = _operands((3, 8), (8, 5), jnp.float32)
    np.testing.assert_array_equal(layers.dot_general(a, b, (((1,), (0,)), ((), ()))), a @ b)
    np.testing.assert_array_equal(layers.dot_general(a.T, b, (((0,), (0,)), ((), ()))),
                                  jax.lax.dot_general(a.T, b, (((0,), (0,)), ((), ()))))
    with pytest.raises(ValueError, match="batch dimensions"):
        layers.matmul(jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((5, 4, 6), jnp.bfloat16))


def test_bf16_vit_gradient_points_where_fp32_does():
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    images = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    labels = jnp.array([0, 1, 2, 1])

    def gradient(dtype):
        model = ViT(config, dtype=dtype, rngs=nnx.Rngs(0))
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            logits = nnx.merge(graph, params, rest)(images).astype(jnp.float32)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

        return jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(jax.grad(loss)(params))])

    full, mixed = gradient(None), gradient(jnp.bfloat16)
    assert mixed.dtype == jnp.float32
    cosine = float(full @ mixed / (jnp.linalg.norm(full) * jnp.linalg.norm(mixed)))
    assert cosine > 0.999, cosine
