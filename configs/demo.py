"""Demo: a small ViT from scratch on the built-in synthetic brain-MRI phantoms (4 classes, 8000 training images);
~6 minutes on a 2-core CPU including the evaluation, ~88% test accuracy.

    python -m jaxmed.main --config configs/demo.py --workdir runs/demo
Also learns a small real image folder: --config.data.format=imagefolder --config.data.root=DIR
(DIR/train/<class>/*, DIR/test/<class>/*).

A ViT from scratch is data-hungry: on this budget it learns most from many fresh images at a low resolution with
small patches (32², 4×4 patches: 64 tokens), and the reference augmentations slow it down more than they help
(4 epochs: 64% val accuracy with them, 83% without). Real data wants them back: configs/brisc_vit_scratch.py.
"""

from jaxmed.config import base_config

IMAGE_SIZE = 32


def get_config():
    config = base_config()
    config.data.format = "synthetic"
    config.data.synthetic.size = 96
    config.data.synthetic.train_per_class = 2000
    config.data.cache_size = 40
    config.data.augment.enabled = False
    config.model.name = "vit"
    config.model.hf_config = dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=256)
    # resize the whole image (no centre crop: the phantoms' lesions can sit near the edge)
    config.model.preprocessor = dict(image_processor_type="ViTImageProcessor",
                                     size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config.train.epochs = 8
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.optim.lr = 5e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_ratio = 0.1
    config.optim.schedule = "cosine"
    config.mesh.data = 1  # one device: on a CPU, splitting these small batches 8 ways only adds overhead
    return config
