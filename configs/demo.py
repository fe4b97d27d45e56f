"""Demo: a small ViT from scratch on the built-in synthetic MRI phantoms (4 classes); minutes on a CPU.

    python -m jaxmed.main --config configs/demo.py --workdir runs/demo
Also learns a small real image folder: --config.data.format=imagefolder --config.data.root=DIR
(DIR/train/<class>/*, DIR/test/<class>/*).
"""

from jaxmed.config import base_config

IMAGE_SIZE = 64


def get_config():
    config = base_config()
    config.data.format = "synthetic"
    config.data.synthetic.size = 96
    config.data.cache_size = 80
    config.model.name = "vit"
    config.model.hf_config = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.0)
    config.model.preprocessor = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config.train.epochs = 8
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_ratio = 0.05
    config.optim.schedule = "cosine"
    return config
