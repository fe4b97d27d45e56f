"""Sartaj + microsoft/cvt-13: the reference fine-tuning protocol (jaxmed.protocols.finetune).

    python -m jaxmed.main --config configs/sartaj_cvt.py --workdir runs/sartaj_cvt [--config.data.root=PATH]
"""

from jaxmed import protocols
from jaxmed.config import base_config


def get_config():
    config = protocols.sartaj(base_config())
    return protocols.finetune(config, "microsoft/cvt-13")
