"""ResNet (HF `ResNetForImageClassification`) in Flax NNX; attribute names mirror HF checkpoint keys."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import ResNetConfig

from jaxmed.models import layers, remat
from jaxmed.models.layers import BatchNorm, Conv, Static, activation, torch_conv_padding, torch_linear_init


class Output(NamedTuple):
    logits: jax.Array
    hidden_states: tuple | None = None  # stem output and every stage's output (NHWC), like HF
    attentions: None = None
    features: jax.Array | None = None  # the pooled representation the classifier reads (OOD detection)


# HF initialises convolutions with kaiming_normal(fan_out, relu).
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvLayer(nnx.Module):
    """Conv (PyTorch padding k//2, no bias) → BatchNorm → optional activation."""

    def __init__(self, cin, cout, kernel=3, stride=1, act: str | None = "relu", *, dtype, rngs):
        self.convolution = Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                                    padding=torch_conv_padding(kernel, stride, kernel // 2), use_bias=False,
                                    kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.normalization = BatchNorm(cout, dtype=dtype)
        self.act = activation(act) if act is not None else None

    def __call__(self, x):
        x = self.normalization(self.convolution(x))
        return self.act(x) if self.act is not None else x


class ShortCut(nnx.Module):
    def __init__(self, cin, cout, stride, *, dtype, rngs):
        self.convolution = Conv(cin, cout, (1, 1), strides=(stride, stride), padding="VALID",
                                    use_bias=False, kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.normalization = BatchNorm(cout, dtype=dtype)

    def __call__(self, x):
        return self.normalization(self.convolution(x))


# HF builds the inner convolutions of its blocks with ResNetConvLayer's default activation, "relu", whatever
# config.hidden_act says; only the stem and each block's output use hidden_act. We mirror that exactly.
INNER_ACT = "relu"


class BasicLayer(nnx.Module):
    def __init__(self, cin, cout, stride, act, *, dtype, rngs, **_):
        self.shortcut = ShortCut(cin, cout, stride, dtype=dtype, rngs=rngs) if cin != cout or stride != 1 else None
        self.layer = nnx.List([
            ConvLayer(cin, cout, stride=stride, act=INNER_ACT, dtype=dtype, rngs=rngs),
            ConvLayer(cout, cout, act=None, dtype=dtype, rngs=rngs),
        ])
        self.act = activation(act)

    def __call__(self, x):
        residual = self.shortcut(x) if self.shortcut is not None else x
        for conv in self.layer:
            x = conv(x)
        return self.act(x + residual)


class BottleNeckLayer(BasicLayer):
    def __init__(self, cin, cout, stride, act, *, downsample_in_bottleneck=False, reduction=4, dtype, rngs):
        mid = cout // reduction
        self.shortcut = ShortCut(cin, cout, stride, dtype=dtype, rngs=rngs) if cin != cout or stride != 1 else None
        self.layer = nnx.List([
            ConvLayer(cin, mid, kernel=1, stride=stride if downsample_in_bottleneck else 1, act=INNER_ACT,
                      dtype=dtype, rngs=rngs),
            ConvLayer(mid, mid, stride=1 if downsample_in_bottleneck else stride, act=INNER_ACT, dtype=dtype,
                      rngs=rngs),
            ConvLayer(mid, cout, kernel=1, act=None, dtype=dtype, rngs=rngs),
        ])
        self.act = activation(act)


class Stage(nnx.Module):
    def __init__(self, config: ResNetConfig, cin, cout, stride, depth, *, dtype, rngs):
        block = BottleNeckLayer if config.layer_type == "bottleneck" else BasicLayer
        kwargs = dict(downsample_in_bottleneck=config.downsample_in_bottleneck, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [block(cin, cout, stride, config.hidden_act, **kwargs)]
            + [block(cout, cout, 1, config.hidden_act, **kwargs) for _ in range(depth - 1)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nnx.Module):
    def __init__(self, config: ResNetConfig, *, dtype, rngs):
        self.embedder = ConvLayer(config.num_channels, config.embedding_size, kernel=7, stride=2,
                                  act=config.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.embedder(x)
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Encoder(nnx.Module):
    def __init__(self, config: ResNetConfig, *, dtype, rngs):
        sizes = [config.embedding_size, *config.hidden_sizes]
        strides = [2 if config.downsample_in_first_stage else 1] + [2] * (len(config.depths) - 1)
        self.stages = nnx.List([Stage(config, sizes[i], sizes[i + 1], strides[i], depth, dtype=dtype, rngs=rngs)
                                for i, depth in enumerate(config.depths)])


class ResNetModel(nnx.Module):
    def __init__(self, config: ResNetConfig, *, dtype, rngs):
        self.embedder = Embeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)


class ResNet(nnx.Module):
    """`ResNetForImageClassification`: stem → stages → global average pool → linear. Input is NHWC."""

    remat = "none"  # model.remat: jaxmed.models.remat checkpoints each residual stage

    def __init__(self, config: ResNetConfig, *, dtype=None, rngs: nnx.Rngs):
        self.hf_config = Static(config)
        self.resnet = ResNetModel(config, dtype=dtype, rngs=rngs)
        self.classifier = nnx.Linear(config.hidden_sizes[-1], config.num_labels, dtype=dtype, rngs=rngs,
                                     kernel_init=torch_linear_init, dot_general=layers.dot_general)

    @property
    def config(self) -> ResNetConfig:
        return self.hf_config.value

    def forward(self, pixels, *, output_hidden_states=False, output_attentions=False) -> Output:
        x = self.resnet.embedder(pixels)
        hidden = [x]
        for stage in self.resnet.encoder.stages:
            x = remat.call(self.remat, stage, x)
            hidden.append(x)
        pooled = jnp.mean(x, axis=(1, 2))
        logits = self.classifier(pooled)
        return Output(logits, tuple(hidden) if output_hidden_states else None, features=pooled)

    def __call__(self, pixels, **kwargs):
        return self.forward(pixels, **kwargs).logits
