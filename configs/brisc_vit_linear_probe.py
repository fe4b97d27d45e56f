"""BRISC 2025, frozen ImageNet ViT-B/16 backbone + linear head (the reference's linear probe), 20 epochs.

    python -m jaxmed.main --config configs/brisc_vit_linear_probe.py --workdir runs/brisc_vit_probe
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    config = protocols.finetune(protocols.brisc(base_config()), "google/vit-base-patch16-224")
    return protocols.linear_probe(config, epochs=20)
