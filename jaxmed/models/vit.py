"""Vision Transformer (HF `ViTForImageClassification`) in Flax NNX; attribute names mirror HF checkpoint keys."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import ViTConfig

from jaxmed.models import layers, remat
from jaxmed.models.layers import Static, activation, torch_bicubic_resize


class Output(NamedTuple):
    logits: jax.Array
    hidden_states: tuple | None = None  # embeddings + every layer's output, like HF
    attentions: tuple | None = None  # per layer (B, heads, tokens, tokens)
    features: jax.Array | None = None  # the pooled representation the classifier reads (OOD detection)


def _linear(din, dout, config, rngs, dtype, use_bias=True):
    init = nnx.initializers.normal(config.initializer_range)
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, dtype=dtype, rngs=rngs,
                      dot_general=layers.dot_general)


def _layernorm(config, dtype, rngs):
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)


class PatchEmbeddings(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        p = config.patch_size
        self.projection = nnx.Conv(config.num_channels, config.hidden_size, (p, p), strides=(p, p),
                                   padding="VALID", dtype=dtype, rngs=rngs,
                                   kernel_init=nnx.initializers.normal(config.initializer_range))

    def __call__(self, pixels):
        tokens = self.projection(pixels)
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


class Embeddings(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        num_patches = (config.image_size // config.patch_size) ** 2
        init = nnx.initializers.truncated_normal(config.initializer_range)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, config.hidden_size)))
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, num_patches + 1, config.hidden_size)))
        self.patch_embeddings = PatchEmbeddings(config, dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.patch_size = config.patch_size
        self.image_size = config.image_size

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int):
        """HF's `interpolate_pos_encoding`: torch-bicubic resize of the patch position grid."""
        positions = self.position_embeddings.value
        num_positions = positions.shape[1] - 1
        if num_patches == num_positions and height == width:
            return positions
        side = int(num_positions**0.5)
        grid = positions[0, 1:].reshape(side, side, -1)
        grid = torch_bicubic_resize(grid, (height // self.patch_size, width // self.patch_size))
        return jnp.concatenate([positions[:, :1], grid.reshape(1, -1, grid.shape[-1])], axis=1)

    def __call__(self, pixels, interpolate_pos_encoding: bool | None = None):
        batch, height, width, _ = pixels.shape
        tokens = self.patch_embeddings(pixels)
        cls = jnp.broadcast_to(self.cls_token.value.astype(tokens.dtype), (batch, 1, tokens.shape[-1]))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        resized = (height, width) != (self.image_size, self.image_size)
        if interpolate_pos_encoding or (interpolate_pos_encoding is None and resized):
            positions = self.interpolate_pos_encoding(tokens.shape[1] - 1, height, width)
        else:
            positions = self.position_embeddings.value
        return self.dropout(tokens + positions.astype(tokens.dtype))


class SelfAttention(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = _linear(d, d, config, rngs, dtype, use_bias=config.qkv_bias)
        self.key = _linear(d, d, config, rngs, dtype, use_bias=config.qkv_bias)
        self.value = _linear(d, d, config, rngs, dtype, use_bias=config.qkv_bias)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

    def __call__(self, x, output_attentions: bool = False):
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads

        q, k, v = (layers.split_heads(linear(x), self.num_heads, self.query.dtype)
                   for linear in (self.query, self.key, self.value))
        # Batched matmuls on head-major tensors: XLA:CPU runs these ~2.5x faster than the equivalent einsums.
        context, weights = layers.attention(q, k, v, head_dim**-0.5, self.dropout, need_weights=output_attentions)
        return context.transpose(0, 2, 1, 3).reshape(batch, tokens, dim), weights


class SelfOutput(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.dense = _linear(config.hidden_size, config.hidden_size, config, rngs, dtype)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.dense(x))


class Attention(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.attention = SelfAttention(config, dtype, rngs)
        self.output = SelfOutput(config, dtype, rngs)

    def __call__(self, x, output_attentions: bool = False):
        context, weights = self.attention(x, output_attentions)
        return self.output(context), weights


class Intermediate(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.dense = _linear(config.hidden_size, config.intermediate_size, config, rngs, dtype)
        self.act = activation(config.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class LayerOutput(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.dense = _linear(config.intermediate_size, config.hidden_size, config, rngs, dtype)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x, residual):
        return self.dropout(self.dense(x)) + residual


class Layer(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.attention = Attention(config, dtype, rngs)
        self.intermediate = Intermediate(config, dtype, rngs)
        self.output = LayerOutput(config, dtype, rngs)
        self.layernorm_before = _layernorm(config, dtype, rngs)
        self.layernorm_after = _layernorm(config, dtype, rngs)

    def __call__(self, x, output_attentions: bool = False):
        attended, weights = self.attention(self.layernorm_before(x), output_attentions)
        x = attended + x
        return self.output(self.intermediate(self.layernorm_after(x)), x), weights


class Encoder(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(config, dtype, rngs) for _ in range(config.num_hidden_layers)])


class ViTModel(nnx.Module):
    def __init__(self, config: ViTConfig, dtype, rngs: nnx.Rngs):
        self.embeddings = Embeddings(config, dtype, rngs)
        self.encoder = Encoder(config, dtype, rngs)
        self.layernorm = _layernorm(config, dtype, rngs)


class ViT(nnx.Module):
    """`ViTForImageClassification`: CLS token → final LayerNorm → linear classifier. Input is NHWC."""

    remat = "none"  # model.remat: jaxmed.models.remat checkpoints each encoder layer

    def __init__(self, config: ViTConfig, *, dtype=None, rngs: nnx.Rngs):
        self.hf_config = Static(config)
        self.vit = ViTModel(config, dtype, rngs)
        self.classifier = _linear(config.hidden_size, config.num_labels, config, rngs, dtype)

    @property
    def config(self) -> ViTConfig:
        return self.hf_config.value

    def forward(self, pixels, *, output_hidden_states=False, output_attentions=False,
                interpolate_pos_encoding: bool | None = None) -> Output:
        x = self.vit.embeddings(pixels, interpolate_pos_encoding)
        hidden, attentions = [x], []
        for layer in self.vit.encoder.layer:
            x, weights = remat.call(self.remat, layer, x, output_attentions)
            hidden.append(x)
            attentions.append(weights)
        x = self.vit.layernorm(x)
        logits = self.classifier(x[:, 0])
        return Output(logits, tuple(hidden) if output_hidden_states else None,
                      tuple(attentions) if output_attentions else None, x[:, 0])

    def __call__(self, pixels, **kwargs):
        return self.forward(pixels, **kwargs).logits
