"""jaxmed's models: Flax NNX modules whose attribute names mirror the HF PyTorch checkpoints."""

from transformers import CvtConfig, EfficientNetConfig, ResNetConfig, ViTConfig

from jaxmed.models.cvt import CvT
from jaxmed.models.efficientnet import EfficientNet
from jaxmed.models.resnet import ResNet
from jaxmed.models.sae import SAE, SAEConfig
from jaxmed.models.vit import ViT

# HF config.json `model_type` → (transformers config class, our module). An explicit dict, not a registry.
MODELS = {
    "vit": (ViTConfig, ViT),
    "resnet": (ResNetConfig, ResNet),
    "cvt": (CvtConfig, CvT),
    "efficientnet": (EfficientNetConfig, EfficientNet),
    "jaxmed_sae": (SAEConfig, SAE),  # ours: no transformers class (see jaxmed/models/sae.py for the format)
}

__all__ = ["MODELS", "CvT", "EfficientNet", "ResNet", "SAE", "SAEConfig", "ViT"]
