"""Sartaj + google/vit-base-patch16-224: the reference fine-tuning protocol (jaxmed.protocols.finetune).

    python -m jaxmed.main --config configs/sartaj_vit.py --workdir runs/sartaj_vit [--config.data.root=PATH]
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    config = protocols.sartaj(base_config())
    return protocols.finetune(config, "google/vit-base-patch16-224")
