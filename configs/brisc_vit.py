"""BRISC 2025 + google/vit-base-patch16-224: the reference fine-tuning protocol (jaxmed.protocols.finetune).

    python -m jaxmed.main --config configs/brisc_vit.py --workdir runs/brisc_vit [--config.data.root=PATH]
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    config = protocols.brisc(base_config())
    return protocols.finetune(config, "google/vit-base-patch16-224")
