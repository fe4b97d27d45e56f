"""jaxmed's models: Flax NNX modules whose attribute names mirror the HF PyTorch checkpoints."""

from transformers import ResNetConfig, ViTConfig

from jaxmed.models.resnet import ResNet
from jaxmed.models.vit import ViT

# HF config.json `model_type` → (transformers config class, our module). An explicit dict, not a registry.
MODELS = {
    "vit": (ViTConfig, ViT),
    "resnet": (ResNetConfig, ResNet),
}

# The public conversion API lives with the tables; re-exported here because users think of it as the models'.
from jaxmed.convert.hub import from_pretrained, save_pretrained  # noqa: E402

__all__ = ["MODELS", "ResNet", "ViT", "from_pretrained", "save_pretrained"]
