"""BRISC 2025 + the reference's stacked autoencoder: 64×64 gray pixels → 1024 → 256 → 64 sigmoid codes, each
encoder pretrained greedily to reconstruct its input (10 epochs each), then a linear classifier on the frozen
encoders (20 epochs).

    python -m jaxmed.main --config configs/brisc_sae.py --workdir runs/brisc_sae
"""

from jaxmed import protocols
from jaxmed.config import base_config

IMAGE_SIZE = 64
HIDDEN_SIZES = [1024, 256, 64]


def get_config():
    config = protocols.finetune(protocols.brisc(base_config()), "", lr=1e-3, batch_size=32)
    config.model.name = "jaxmed_sae"
    config.model.hf_config = dict(image_size=IMAGE_SIZE, grayscale=True, hidden_sizes=HIDDEN_SIZES,
                                  hidden_act="sigmoid", dropout=0.0)
    config.model.preprocessor = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config.data.cache_size = 80  # augmentation crops from a little more than the model sees
    protocols.greedy_layerwise(config, len(HIDDEN_SIZES), epochs=10, lr=1e-3, classifier_epochs=20,
                               classifier_lr=1e-3)
    return config
