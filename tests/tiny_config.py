"""A tiny but complete experiment (synthetic phantoms, 2-layer ViT) for trainer tests; also a config file:
`python -m jaxmed.main --config tests/tiny_config.py --config.data.cache_dir=...`."""

from jaxmed.config import base_config


def get_config():
    config = base_config()
    config.seed = 3
    config.data.format = "synthetic"
    config.data.synthetic.size = 32
    config.data.synthetic.train_per_class = 16
    config.data.synthetic.test_per_class = 4
    config.data.cache_size = 32
    config.model.name = "vit"
    config.model.hf_config = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.1,
                                  attention_probs_dropout_prob=0.1)
    config.model.preprocessor = dict(size={"height": 32, "width": 32})
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    config.train.steps = 8
    config.train.log_every_steps = 1
    config.train.eval_every_steps = 4
    config.optim.lr = 1e-3
    return config
