"""CvT (HF `CvtForImageClassification`, e.g. microsoft/cvt-13) in Flax NNX; attribute names mirror HF checkpoint keys.

It reproduces HF's forward exactly, quirks included, so a checkpoint computes here what it computes in transformers:
every LayerNorm uses torch's default eps 1e-5 (`config.layer_norm_eps` is never read), the attention scale is
`embed_dim ** -0.5` (not per head), the second drop path also covers the residual, and all layers of stage i
share the drop-path rate `linspace(0, drop_path_rate[i], depth[i])[i]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CvtConfig

from jaxmed.models import layers, remat
from jaxmed.models.layers import BatchNorm, DepthwiseConv, Static, activation, materialize

# nn.LayerNorm's default: HF's CvT never passes config.layer_norm_eps to its LayerNorms.
LAYER_NORM_EPS = 1e-5


class Output(NamedTuple):
    logits: jax.Array
    hidden_states: tuple | None = None  # every stage's output grid (B, H, W, C), like HF (which is NCHW)
    attentions: tuple | None = None  # per layer over all stages (B, heads, queries, keys); HF does not return these
    features: jax.Array | None = None  # the pooled representation the classifier reads (OOD detection)


def _init(config: CvtConfig):
    return nnx.initializers.truncated_normal(config.initializer_range)


def _linear(din, dout, config, rngs, dtype, use_bias=True):
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=_init(config), dtype=dtype, rngs=rngs,
                      dot_general=layers.dot_general)


def _layernorm(dim, dtype, rngs):
    # Two-pass variance, as torch computes it (flax's fast variance E[x²]-E[x]² loses digits).
    return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, rngs=rngs)


def _pad(padding: int):
    return ((padding, padding), (padding, padding))


def torch_avg_pool_ceil(x, kernel: int, stride: int, padding: int):
    """torch `AvgPool2d(kernel, stride, padding, ceil_mode=True)` (count_include_pad) on NHWC.

    The original CvT's "avg" projection. ceil_mode adds a last, partial window whose divisor counts the zero
    padding but not the overhang beyond it, so the divisor is a per-position table, not kernel².
    """

    def axis(size):
        out = -(-(size + 2 * padding - kernel) // stride) + 1
        if (out - 1) * stride >= size + padding:  # torch: the last window must start inside the padded input
            out -= 1
        starts = np.arange(out) * stride - padding
        counts = np.minimum(starts + kernel, size + padding) - starts
        extra = max(0, (out - 1) * stride + kernel - size - 2 * padding)
        return out, counts, (padding, padding + extra)

    _, h_counts, h_pad = axis(x.shape[1])
    _, w_counts, w_pad = axis(x.shape[2])
    # A Python 0.0 lets JAX recognise a windowed sum, which (unlike a generic reduce_window) has a gradient.
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, kernel, kernel, 1),
                                 (1, stride, stride, 1), ((0, 0), h_pad, w_pad, (0, 0)))
    divisor = np.outer(h_counts, w_counts).astype(np.float32)[None, :, :, None]
    return sums / jnp.asarray(divisor, x.dtype)


class DropPath(nnx.Module):
    """Stochastic depth per sample (HF `CvtDropPath`): identity when deterministic or the rate is 0."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if rate > 0 else None

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ConvEmbeddings(nnx.Module):
    """Overlapping patch embedding: strided conv with explicit torch padding, then LayerNorm over channels."""

    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        cin = config.num_channels if stage == 0 else config.embed_dim[stage - 1]
        cout, kernel = config.embed_dim[stage], config.patch_sizes[stage]
        self.projection = nnx.Conv(cin, cout, (kernel, kernel), strides=config.patch_stride[stage],
                                   padding=_pad(config.patch_padding[stage]), kernel_init=_init(config),
                                   dtype=dtype, rngs=rngs)
        self.normalization = _layernorm(cout, dtype, rngs)

    def __call__(self, pixels):
        return self.normalization(self.projection(pixels))


class Embeddings(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        self.convolution_embeddings = ConvEmbeddings(config, stage, dtype, rngs)
        self.dropout = nnx.Dropout(config.drop_rate[stage], rngs=rngs)

    def __call__(self, pixels):
        return self.dropout(self.convolution_embeddings(pixels))


class ConvProjection(nnx.Module):
    """Depthwise conv (no bias) + BatchNorm: CvT's "dw_bn" q/k/v projection."""

    def __init__(self, dim, kernel, padding, stride, dtype, rngs, config):
        self.convolution = DepthwiseConv(dim, kernel, strides=stride, padding=_pad(padding),
                                         kernel_init=_init(config), dtype=dtype, rngs=rngs)
        self.normalization = BatchNorm(dim, dtype=dtype)

    def __call__(self, grid):
        return self.normalization(self.convolution(grid))


class AvgProjection(nnx.Module):
    """The original CvT "avg" key/value projection (no parameters).

    HF's port declares "avg" but builds no module for it, so an HF "avg" model fails in forward; this is the
    Microsoft implementation the option names (`AvgPool2d(kernel, stride, padding, ceil_mode=True)`).
    """

    def __init__(self, kernel, padding, stride):
        self.kernel, self.padding, self.stride = kernel, padding, stride

    def __call__(self, grid):
        return torch_avg_pool_ceil(grid, self.kernel, self.stride, self.padding)


class Projection(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, method: str, padding: int, stride: int, dtype, rngs):
        dim, kernel = config.embed_dim[stage], config.kernel_qkv[stage]
        if method == "dw_bn":
            self.convolution_projection = ConvProjection(dim, kernel, padding, stride, dtype, rngs, config)
        elif method == "avg":
            self.convolution_projection = AvgProjection(kernel, padding, stride)
        elif method == "linear":  # the query of an "avg" model: tokens as they are
            self.convolution_projection = None
        else:
            raise ValueError(f"CvtConfig.qkv_projection_method[{stage}]={method!r}: expected 'dw_bn' or 'avg'")

    def __call__(self, grid):
        if self.convolution_projection is not None:
            grid = self.convolution_projection(grid)
        return grid.reshape(grid.shape[0], -1, grid.shape[-1])


class SelfAttention(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        dim, method = config.embed_dim[stage], config.qkv_projection_method[stage]
        self.num_heads = config.num_heads[stage]
        self.with_cls_token = bool(config.cls_token[stage])
        self.scale = dim**-0.5  # HF (and the original CvT) scale by the full width, not the head width
        self.convolution_projection_query = Projection(
            config, stage, "linear" if method == "avg" else method, config.padding_q[stage], config.stride_q[stage],
            dtype, rngs)
        self.convolution_projection_key = Projection(config, stage, method, config.padding_kv[stage],
                                                     config.stride_kv[stage], dtype, rngs)
        self.convolution_projection_value = Projection(config, stage, method, config.padding_kv[stage],
                                                       config.stride_kv[stage], dtype, rngs)
        bias = config.qkv_bias[stage]
        self.projection_query = _linear(dim, dim, config, rngs, dtype, use_bias=bias)
        self.projection_key = _linear(dim, dim, config, rngs, dtype, use_bias=bias)
        self.projection_value = _linear(dim, dim, config, rngs, dtype, use_bias=bias)
        self.dropout = nnx.Dropout(config.attention_drop_rate[stage], rngs=rngs)

    def __call__(self, x, height, width, output_attentions: bool = False):
        batch, _, dim = x.shape
        if self.with_cls_token:
            cls, x = x[:, :1], x[:, 1:]
        grid = x.reshape(batch, height, width, dim)
        query = self.convolution_projection_query(grid)
        key = self.convolution_projection_key(grid)
        value = self.convolution_projection_value(grid)
        if self.with_cls_token:
            query, key, value = (jnp.concatenate([cls, t], axis=1) for t in (query, key, value))

        query, key, value = (layers.split_heads(linear(t), self.num_heads, self.projection_query.dtype)
                             for linear, t in ((self.projection_query, query), (self.projection_key, key),
                                               (self.projection_value, value)))
        # head-major batched matmuls: XLA:CPU runs these much faster than the equivalent einsums (as in vit.py)
        context, weights = layers.attention(query, key, value, self.scale, self.dropout,
                                            need_weights=output_attentions)
        return context.transpose(0, 2, 1, 3).reshape(batch, -1, dim), weights


class SelfOutput(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        dim = config.embed_dim[stage]
        self.dense = _linear(dim, dim, config, rngs, dtype)
        self.dropout = nnx.Dropout(config.drop_rate[stage], rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.dense(x))


class Attention(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        self.attention = SelfAttention(config, stage, dtype, rngs)
        self.output = SelfOutput(config, stage, dtype, rngs)

    def __call__(self, x, height, width, output_attentions: bool = False):
        context, weights = self.attention(x, height, width, output_attentions)
        return self.output(context), weights


class Intermediate(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        dim = config.embed_dim[stage]
        self.dense = _linear(dim, int(dim * config.mlp_ratio[stage]), config, rngs, dtype)
        self.act = activation("gelu")  # HF hard-codes nn.GELU() (exact)

    def __call__(self, x):
        return self.act(self.dense(x))


class LayerOutput(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        dim = config.embed_dim[stage]
        self.dense = _linear(int(dim * config.mlp_ratio[stage]), dim, config, rngs, dtype)
        self.dropout = nnx.Dropout(config.drop_rate[stage], rngs=rngs)

    def __call__(self, x, residual):
        return self.dropout(self.dense(x)) + residual


class Layer(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, drop_path_rate: float, dtype, rngs):
        dim = config.embed_dim[stage]
        self.attention = Attention(config, stage, dtype, rngs)
        self.intermediate = Intermediate(config, stage, dtype, rngs)
        self.output = LayerOutput(config, stage, dtype, rngs)
        self.drop_path = DropPath(drop_path_rate, rngs=rngs)
        self.layernorm_before = _layernorm(dim, dtype, rngs)
        self.layernorm_after = _layernorm(dim, dtype, rngs)

    def __call__(self, x, height, width, output_attentions: bool = False):
        attended, weights = self.attention(self.layernorm_before(x), height, width, output_attentions)
        x = materialize(self.drop_path(attended) + x)
        # HF drops the whole (MLP + residual) sum, not just the MLP branch.
        out = self.drop_path(self.output(self.intermediate(self.layernorm_after(x)), x))
        return materialize(out), weights


def _stage_drop_path_rate(config: CvtConfig, stage: int) -> float:
    # HF indexes the per-layer linspace with the *stage* number, so one rate serves every layer of the stage.
    rates = np.linspace(0.0, config.drop_path_rate[stage], config.depth[stage], dtype=np.float32)
    if stage >= len(rates):
        raise ValueError(f"CvtConfig.depth[{stage}]={config.depth[stage]}: HF's CvT needs depth[i] > i "
                         f"(it reads linspace(0, drop_path_rate[i], depth[i])[i])")
    return float(rates[stage])


class Stage(nnx.Module):
    def __init__(self, config: CvtConfig, stage: int, dtype, rngs):
        if config.cls_token[stage]:
            if config.embed_dim[stage] != config.embed_dim[-1]:
                raise ValueError(f"CvtConfig.cls_token[{stage}] needs embed_dim[{stage}] == embed_dim[-1]: HF sizes "
                                 "every stage's cls token by the last stage's width")
            self.cls_token = nnx.Param(_init(config)(rngs.params(), (1, 1, config.embed_dim[-1])))
        else:
            self.cls_token = None
        self.embedding = Embeddings(config, stage, dtype, rngs)
        rate = _stage_drop_path_rate(config, stage)
        self.layers = nnx.List([Layer(config, stage, rate, dtype, rngs) for _ in range(config.depth[stage])])

    def __call__(self, pixels, output_attentions: bool = False):
        grid = self.embedding(pixels)
        batch, height, width, dim = grid.shape
        x = grid.reshape(batch, height * width, dim)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (batch, 1, dim))
            x = jnp.concatenate([cls, x], axis=1)
        attentions = []
        for layer in self.layers:
            x, weights = layer(x, height, width, output_attentions)
            attentions.append(weights)
        cls = None
        if self.cls_token is not None:
            cls, x = x[:, :1], x[:, 1:]
        return x.reshape(batch, height, width, dim), cls, attentions


class Encoder(nnx.Module):
    def __init__(self, config: CvtConfig, dtype, rngs):
        self.stages = nnx.List([Stage(config, i, dtype, rngs) for i in range(len(config.depth))])


class CvtModel(nnx.Module):
    def __init__(self, config: CvtConfig, dtype, rngs):
        self.encoder = Encoder(config, dtype, rngs)


class CvT(nnx.Module):
    """`CvtForImageClassification`: stages → LayerNorm of the cls token (or all tokens) → mean → linear; NHWC."""

    remat = "none"  # model.remat: jaxmed.models.remat checkpoints each stage

    def __init__(self, config: CvtConfig, *, dtype=None, rngs: nnx.Rngs):
        self.hf_config = Static(config)
        self.cvt = CvtModel(config, dtype, rngs)
        self.layernorm = _layernorm(config.embed_dim[-1], dtype, rngs)
        self.classifier = (_linear(config.embed_dim[-1], config.num_labels, config, rngs, dtype)
                           if config.num_labels > 0 else None)

    @property
    def config(self) -> CvtConfig:
        return self.hf_config.value

    def forward(self, pixels, *, output_hidden_states=False, output_attentions=False) -> Output:
        x, cls, hidden, attentions = pixels, None, [], []
        for stage in self.cvt.encoder.stages:
            x, cls, weights = remat.call(self.remat, stage, x, output_attentions)
            hidden.append(x)
            attentions.extend(weights)
        # HF keys this on the last stage's flag; the cls token is that stage's.
        tokens = cls if self.config.cls_token[-1] else x.reshape(x.shape[0], -1, x.shape[-1])
        pooled = jnp.mean(self.layernorm(tokens), axis=1)
        logits = self.classifier(pooled) if self.classifier is not None else pooled
        return Output(logits, tuple(hidden) if output_hidden_states else None,
                      tuple(attentions) if output_attentions else None, pooled)

    def __call__(self, pixels, **kwargs):
        return self.forward(pixels, **kwargs).logits
