"""The reference's stacked autoencoder (SAE): flattened gray pixels → dense encoders → linear classifier, with one
decoder per encoder for greedy layer-wise reconstruction pretraining (phases with objective "reconstruction").

No transformers class exists for it. Its model directory follows HF conventions so the usual tools read it:
  config.json               SAEConfig.to_dict(): model_type "jaxmed_sae", architectures ["SAEForImageClassification"],
                            image_size, num_channels, grayscale, hidden_sizes, hidden_act, dropout, id2label, …
  model.safetensors         torch nn.Linear keys and layouts: encoders.{k}.weight (out, in), encoders.{k}.bias,
                            decoders.{k}.weight / .bias, classifier.weight / .bias
  preprocessor_config.json  ViTImageProcessor: resize to image_size², mean = std = 0.5
transformers' Auto classes cannot open it; `jaxmed.models.from_pretrained` / `save_pretrained` round-trip it, and a
PyTorch user rebuilds it with `nn.Linear(in, out)` per key and `load_state_dict`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import PreTrainedConfig

from jaxmed.errors import JaxmedError
from jaxmed.models import layers
from jaxmed.models.layers import Static, activation, torch_linear_init

SAE_ACTIVATIONS = ("sigmoid", "relu")


class SAEConfig(PreTrainedConfig):
    """Stacked autoencoder classifier. `image_size` is the side of the preprocessor's (resized) output."""

    model_type = "jaxmed_sae"

    image_size: int = 64
    num_channels: int = 3
    grayscale: bool = True  # average the channels first: the input width is image_size² instead of ·num_channels
    hidden_sizes: list[int] | tuple[int, ...] = (1024, 256, 64)
    hidden_act: str = "sigmoid"
    dropout: float = 0.0  # on every code (encoder output), in training only

    def __post_init__(self, **kwargs):
        self.hidden_sizes = [int(size) for size in self.hidden_sizes]
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise JaxmedError(f"SAE hidden_sizes={self.hidden_sizes}: give one positive width per encoder, "
                              "e.g. [1024, 256, 64]")
        if self.hidden_act not in SAE_ACTIVATIONS:
            raise JaxmedError(f"SAE hidden_act={self.hidden_act!r}: choose one of {', '.join(SAE_ACTIVATIONS)}")
        super().__post_init__(**kwargs)

    @property
    def input_width(self) -> int:
        return self.image_size**2 * (1 if self.grayscale else self.num_channels)


class Output(NamedTuple):
    logits: jax.Array
    hidden_states: tuple | None = None  # the flattened input, then every encoder's code
    attentions: None = None  # an SAE has none; kept so callers treat every model alike
    features: jax.Array | None = None  # the pooled representation the classifier reads (OOD detection)


def _linear(din: int, dout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # torch.nn.Linear's default init, weight and bias both U(±1/sqrt(fan_in)), as the PyTorch reference had
    bound = din**-0.5
    return nnx.Linear(din, dout, kernel_init=torch_linear_init, dtype=dtype, rngs=rngs, dot_general=layers.dot_general,
                      bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                                        bound))


class SAE(nnx.Module):
    """Input NHWC float, already resized by the preprocessor to image_size²; returns logits."""

    def __init__(self, config: SAEConfig, *, dtype=None, rngs: nnx.Rngs):
        self.hf_config = Static(config)
        widths = [config.input_width, *config.hidden_sizes]
        self.encoders = nnx.List([_linear(widths[k], widths[k + 1], dtype, rngs) for k in range(len(widths) - 1)])
        # decoder k maps code k back to encoder k's input, so encoder k can be pretrained on its own
        self.decoders = nnx.List([_linear(widths[k + 1], widths[k], dtype, rngs) for k in range(len(widths) - 1)])
        self.classifier = _linear(widths[-1], config.num_labels, dtype, rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.act = activation(config.hidden_act)

    @property
    def config(self) -> SAEConfig:
        return self.hf_config.value

    @property
    def reconstruction_layers(self) -> int:
        """How many layers `reconstruction_loss` can pretrain (the trainer checks phases against it)."""
        return len(self.encoders)

    def flatten(self, pixels):
        config = self.config
        expected = (config.image_size, config.image_size, config.num_channels)
        if tuple(pixels.shape[1:]) != expected:
            raise JaxmedError(f"the SAE takes NHWC images of {expected}, got {tuple(pixels.shape)}: resize them to "
                              f"image_size={config.image_size} (model.preprocessor size) or change the config")
        if config.grayscale:
            pixels = jnp.mean(pixels, axis=-1, keepdims=True)
        return pixels.reshape(pixels.shape[0], -1)

    def encode(self, x, layers: int):
        """The code after the first `layers` encoders, without dropout: the targets and inputs of pretraining."""
        for encoder in list(self.encoders)[:layers]:
            x = self.act(encoder(x))
        return x

    def forward(self, pixels, *, output_hidden_states=False, output_attentions=False) -> Output:
        x = self.flatten(pixels)
        hidden = [x]
        for encoder in self.encoders:
            x = self.dropout(self.act(encoder(x)))
            hidden.append(x)
        return Output(self.classifier(x), tuple(hidden) if output_hidden_states else None, features=x)

    def __call__(self, pixels, **kwargs):
        return self.forward(pixels, **kwargs).logits

    def reconstruction_loss(self, pixels, layer: int):
        """MSE between encoder `layer`'s input and its reconstruction decoder_layer(act(encoder_layer(input))).

        The input comes from the encoders below, which this loss does not train (stop_gradient).
        """
        if not 0 <= layer < len(self.encoders):
            raise JaxmedError(f"reconstruction layer {layer}: the SAE has encoders 0..{len(self.encoders) - 1}")
        inputs = jax.lax.stop_gradient(self.encode(self.flatten(pixels), layer))
        code = self.dropout(self.act(self.encoders[layer](inputs)))
        reconstruction = self.decoders[layer](code)
        return jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - inputs.astype(jnp.float32)))
