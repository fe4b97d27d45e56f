"""Kermany chest X-ray + google/vit-base-patch16-224: balanced sampling, head-only then full fine-tuning, best by pneumonia recall.

    python -m jaxmed.main --config configs/chestxray_vit.py --workdir runs/chestxray_vit [--config.data.root=PATH]
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    return protocols.kermany(base_config(), "google/vit-base-patch16-224")
