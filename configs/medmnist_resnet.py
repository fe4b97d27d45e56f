"""MedMNIST (npz, e.g. pneumoniamnist.npz at 64 px) + a ResNet-18-shaped ResNet from scratch.

    python -m jaxmed.main --config configs/medmnist_resnet.py --workdir runs/medmnist --config.data.root=F.npz
"""

from jaxmed.config import base_config

IMAGE_SIZE = 64


def get_config():
    config = base_config()
    config.data.format = "npz"
    config.data.root = "data/pneumoniamnist_64.npz"
    config.data.source = "download a MedMNIST npz (medmnist.com, e.g. pneumoniamnist_64.npz)"
    config.data.cache_size = IMAGE_SIZE
    config.data.augment.vflip = False
    config.model.name = "resnet"
    config.model.hf_config = dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                  layer_type="basic")
    config.model.preprocessor = dict(size={"shortest_edge": IMAGE_SIZE}, crop_pct=1.0)
    config.train.epochs = 30
    config.train.batch_size = 128
    config.train.eval_batch_size = 256
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.schedule = "cosine"
    config.optim.warmup_ratio = 0.03
    return config
