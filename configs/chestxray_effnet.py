"""Kermany chest X-ray + google/efficientnet-b0: balanced sampling, head-only then full fine-tuning, best by pneumonia recall.

    python -m jaxmed.main --config configs/chestxray_effnet.py --workdir runs/chestxray_effnet [--config.data.root=PATH]
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    return protocols.kermany(base_config(), "google/efficientnet-b0")
