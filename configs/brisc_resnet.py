"""BRISC 2025 + microsoft/resnet-50: the reference fine-tuning protocol (jaxmed.protocols.finetune).

    python -m jaxmed.main --config configs/brisc_resnet.py --workdir runs/brisc_resnet [--config.data.root=PATH]
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    config = protocols.brisc(base_config())
    return protocols.finetune(config, "microsoft/resnet-50")
