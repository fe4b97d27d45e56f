"""BRISC 2025 + the reference's "home-made ViT": a small ViT from random init (no pretrained weights).

    python -m jaxmed.main --config configs/brisc_vit_scratch.py --workdir runs/brisc_vit_scratch
"""

from jaxmed import protocols
from jaxmed.config import base_config

IMAGE_SIZE = 128


def get_config():
    config = protocols.finetune(protocols.brisc(base_config()), "", lr=3e-4, epochs=40, batch_size=32)
    config.model.name = "vit"
    config.model.hf_config = dict(image_size=IMAGE_SIZE, patch_size=16, hidden_size=256, num_hidden_layers=6,
                                  num_attention_heads=8, intermediate_size=512, hidden_dropout_prob=0.1)
    config.model.preprocessor = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config.data.cache_size = 160
    config.optim.weight_decay = 0.05
    config.optim.schedule = "cosine"
    config.optim.warmup_ratio = 0.05
    return config
