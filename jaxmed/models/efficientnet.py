"""EfficientNet (HF `EfficientNetForImageClassification`) in Flax NNX; attribute names mirror HF checkpoint keys.

It reproduces HF's forward exactly, quirks included: the stem and stride-2 depthwise convs pad asymmetrically
(TF "same"), BatchNorm momentum is `config.batch_norm_momentum` in torch's sense (0.99 = weight of the *new*
batch) except the expansion BatchNorm (torch's 0.1), and "drop connect" is HF's element-wise dropout before the
residual, which only blocks after the first of each stage have.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import EfficientNetConfig

from jaxmed.models import layers, remat
from jaxmed.models.layers import BatchNorm, Conv, DepthwiseConv, Static, activation


class Output(NamedTuple):
    logits: jax.Array
    hidden_states: tuple | None = None  # stem output and every block's output (NHWC), like HF
    attentions: None = None
    features: jax.Array | None = None  # the pooled representation the classifier reads (OOD detection)


# The original EfficientNet's conv init; HF's N(0, 0.02) is only a placeholder for converted weights.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def round_filters(config: EfficientNetConfig, channels: int) -> int:
    """HF's width scaling: nearest multiple of depth_divisor, never more than 10% below."""
    divisor = config.depth_divisor
    channels *= config.width_coefficient
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if new < 0.9 * channels:
        new += divisor
    return int(new)


def round_repeats(config: EfficientNetConfig, repeats: int) -> int:
    return int(math.ceil(config.depth_coefficient * repeats))


def _same_padding(kernel: int):
    # torch padding="same" at stride 1: the odd pixel of an even kernel goes right/bottom.
    total = kernel - 1
    return ((total // 2, total - total // 2),) * 2


def _stride2_padding(kernel: int, adjust: bool):
    # HF `correct_pad` + nn.ZeroPad2d: (k//2 - 1, k//2) when adjusted, else k//2 on both sides.
    half = kernel // 2
    return ((half - 1, half),) * 2 if adjust else ((half, half),) * 2


def _conv(cin, cout, kernel=1, *, strides=1, padding="VALID", use_bias=False, dtype, rngs):
    return Conv(cin, cout, (kernel, kernel), strides=strides, padding=padding,
                use_bias=use_bias, kernel_init=_conv_init, dtype=dtype, rngs=rngs)


def _batchnorm(config, dim, dtype, momentum=None):
    return BatchNorm(dim, eps=config.batch_norm_eps,
                     momentum=config.batch_norm_momentum if momentum is None else momentum, dtype=dtype)


class Embeddings(nnx.Module):
    """Stem: zero-pad right/bottom by one, 3×3 stride-2 valid conv, BatchNorm, activation."""

    def __init__(self, config: EfficientNetConfig, dtype, rngs):
        out = round_filters(config, 32)
        self.convolution = _conv(config.num_channels, out, 3, strides=2, padding=((0, 1), (0, 1)), dtype=dtype,
                                 rngs=rngs)
        self.batchnorm = _batchnorm(config, out, dtype)
        self.activation = activation(config.hidden_act)

    def __call__(self, pixels):
        return self.activation(self.batchnorm(self.convolution(pixels)))


class ExpansionLayer(nnx.Module):
    def __init__(self, config: EfficientNetConfig, cin, cout, dtype, rngs):
        self.expand_conv = _conv(cin, cout, dtype=dtype, rngs=rngs)
        self.expand_bn = _batchnorm(config, cout, dtype, momentum=0.1)  # HF passes no momentum here
        self.expand_act = activation(config.hidden_act)

    def __call__(self, x):
        return self.expand_act(self.expand_bn(self.expand_conv(x)))


class DepthwiseLayer(nnx.Module):
    def __init__(self, config: EfficientNetConfig, dim, stride, kernel, adjust_padding, dtype, rngs):
        if stride not in (1, 2):
            raise ValueError(f"EfficientNetConfig.strides: stride {stride} is not supported (HF builds 1 and 2 only)")
        padding = _same_padding(kernel) if stride == 1 else _stride2_padding(kernel, adjust_padding)
        self.depthwise_conv = DepthwiseConv(dim, kernel, strides=stride, padding=padding, kernel_init=_conv_init,
                                            dtype=dtype, rngs=rngs)
        self.depthwise_norm = _batchnorm(config, dim, dtype)
        self.depthwise_act = activation(config.hidden_act)

    def __call__(self, x):
        return self.depthwise_act(self.depthwise_norm(self.depthwise_conv(x)))


class SqueezeExciteLayer(nnx.Module):
    def __init__(self, config: EfficientNetConfig, cin, dim, dtype, rngs):
        squeezed = max(1, int(cin * config.squeeze_expansion_ratio))  # from the block's input width, as in HF
        self.reduce = _conv(dim, squeezed, use_bias=True, dtype=dtype, rngs=rngs)
        self.expand = _conv(squeezed, dim, use_bias=True, dtype=dtype, rngs=rngs)
        self.act_reduce = activation(config.hidden_act)

    def __call__(self, x):
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = jax.nn.sigmoid(self.expand(self.act_reduce(self.reduce(scale))))
        return x * scale


class FinalBlockLayer(nnx.Module):
    def __init__(self, config: EfficientNetConfig, cin, cout, stride, drop_rate, id_skip, dtype, rngs):
        self.apply_dropout = stride == 1 and not id_skip  # also decides the residual
        self.project_conv = _conv(cin, cout, dtype=dtype, rngs=rngs)
        self.project_bn = _batchnorm(config, cout, dtype)
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs)

    def __call__(self, inputs, x):
        x = self.project_bn(self.project_conv(x))
        if self.apply_dropout:
            x = self.dropout(x) + inputs
        return x


class Block(nnx.Module):
    """MBConv: optional 1×1 expansion → depthwise conv → squeeze-excitation → 1×1 projection (+ residual)."""

    def __init__(self, config: EfficientNetConfig, cin, cout, stride, expand_ratio, kernel, drop_rate, id_skip,
                 adjust_padding, dtype, rngs):
        dim = cin * expand_ratio
        self.expansion = ExpansionLayer(config, cin, dim, dtype, rngs) if expand_ratio != 1 else None
        self.depthwise_conv = DepthwiseLayer(config, dim, stride, kernel, adjust_padding, dtype, rngs)
        self.squeeze_excite = SqueezeExciteLayer(config, cin, dim, dtype, rngs)
        self.projection = FinalBlockLayer(config, dim, cout, stride, drop_rate, id_skip, dtype, rngs)

    def __call__(self, inputs):
        x = self.expansion(inputs) if self.expansion is not None else inputs
        return self.projection(inputs, self.squeeze_excite(self.depthwise_conv(x)))


class Encoder(nnx.Module):
    def __init__(self, config: EfficientNetConfig, dtype, rngs):
        num_blocks = sum(round_repeats(config, n) for n in config.num_block_repeats)
        blocks, index = [], 0
        for i in range(len(config.in_channels)):
            cin, cout = round_filters(config, config.in_channels[i]), round_filters(config, config.out_channels[i])
            for j in range(round_repeats(config, config.num_block_repeats[i])):
                blocks.append(Block(
                    config, cin if j == 0 else cout, cout, config.strides[i] if j == 0 else 1, config.expand_ratios[i],
                    config.kernel_sizes[i], config.drop_connect_rate * index / num_blocks, id_skip=j == 0,
                    adjust_padding=index not in config.depthwise_padding, dtype=dtype, rngs=rngs))
                index += 1
        self.blocks = nnx.List(blocks)
        top = round_filters(config, 1280)
        if top != config.hidden_dim:
            raise ValueError(f"EfficientNetConfig.hidden_dim={config.hidden_dim} but the top conv has "
                             f"round_filters(1280)={top} channels for width_coefficient={config.width_coefficient}; "
                             f"HF cannot run this either. Set hidden_dim={top} (the config default 2560 is B7's)")
        self.top_conv = _conv(cout, top, dtype=dtype, rngs=rngs)
        self.top_bn = _batchnorm(config, config.hidden_dim, dtype)
        self.top_activation = activation(config.hidden_act)


class EfficientNetModel(nnx.Module):
    def __init__(self, config: EfficientNetConfig, dtype, rngs):
        if config.pooling_type not in ("mean", "max"):
            raise ValueError(f"EfficientNetConfig.pooling_type={config.pooling_type!r}: expected 'mean' or 'max'")
        self.embeddings = Embeddings(config, dtype, rngs)
        self.encoder = Encoder(config, dtype, rngs)


class EfficientNet(nnx.Module):
    """`EfficientNetForImageClassification`: stem → MBConv blocks → 1×1 top conv → pool → linear. NHWC in."""

    remat = "none"  # model.remat: jaxmed.models.remat checkpoints each MBConv block

    def __init__(self, config: EfficientNetConfig, *, dtype=None, rngs: nnx.Rngs):
        self.hf_config = Static(config)
        self.efficientnet = EfficientNetModel(config, dtype, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
        self.classifier = (nnx.Linear(config.hidden_dim, config.num_labels, dtype=dtype, rngs=rngs,
                                      kernel_init=nnx.initializers.normal(config.initializer_range),
                                      dot_general=layers.dot_general)
                           if config.num_labels > 0 else None)

    @property
    def config(self) -> EfficientNetConfig:
        return self.hf_config.value

    def forward(self, pixels, *, output_hidden_states=False, output_attentions=False) -> Output:
        encoder = self.efficientnet.encoder
        x = self.efficientnet.embeddings(pixels)
        hidden = [x]
        for block in encoder.blocks:
            x = remat.call(self.remat, block, x)
            hidden.append(x)
        x = encoder.top_activation(encoder.top_bn(encoder.top_conv(x)))
        # HF pools with a hidden_dim-sized window in ceil mode: global whenever the map is at most hidden_dim wide.
        pooled = jnp.max(x, axis=(1, 2)) if self.config.pooling_type == "max" else jnp.mean(x, axis=(1, 2))
        pooled = self.dropout(pooled)
        logits = self.classifier(pooled) if self.classifier is not None else pooled
        return Output(logits, tuple(hidden) if output_hidden_states else None, features=pooled)

    def __call__(self, pixels, **kwargs):
        return self.forward(pixels, **kwargs).logits
