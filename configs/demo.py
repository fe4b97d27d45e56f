"""Demo: a small ResNet from scratch on the built-in synthetic brain-MRI phantoms (4 classes, three planes, 6000
training images at 48²); under 2 minutes on a 2-core CPU including data generation and the full evaluation.

    python -m jaxmed.main --config configs/demo.py --workdir runs/demo

Also your own small folder, from scratch: --config.data.format=imagefolder --config.data.root=DIR
(DIR/train/<class>/*, DIR/test/<class>/*; val is carved from train). A small folder's epochs are a handful of
steps, too few to learn from: `train.min_steps` stretches them, and early stopping on val ends the run once val
stops improving; the log says which budget it chose and why.

A small CNN learns the phantoms (and small real folders) far faster than a ViT from scratch, which is
data-hungry; the from-scratch ViT is configs/brisc_vit_scratch.py.
"""

from jaxmed.config import base_config

IMAGE_SIZE = 48


def get_config():
    config = base_config()
    config.data.format = "synthetic"
    config.data.synthetic.size = 96
    config.data.synthetic.train_per_class = 1500
    config.data.cache_size = 56
    config.data.augment.enabled = False  # flips and rotations change what some images mean (digits, laterality)
    config.model.name = "resnet"
    config.model.hf_config = dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                                  layer_type="basic")
    # resize the whole image (no centre crop: the phantoms' lesions can sit near the edge)
    config.model.preprocessor = dict(image_processor_type="ViTImageProcessor",
                                     size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config.train.epochs = 6
    config.train.min_steps = 1000
    config.train.early_stopping_patience = 6
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.optim.lr = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_ratio = 0.05
    config.optim.schedule = "cosine"
    config.mesh.data = 1  # one device: on a CPU, splitting these small batches 8 ways only adds overhead
    return config
