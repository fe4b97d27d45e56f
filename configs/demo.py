"""Demo: a small ResNet from scratch on the built-in synthetic brain-MRI phantoms (4 classes); ~2 minutes on a
2-core CPU, ~94% test accuracy.

    python -m jaxmed.main --config configs/demo.py --workdir runs/demo
Also learns a small real image folder: --config.data.format=imagefolder --config.data.root=DIR
(DIR/train/<class>/*, DIR/test/<class>/*).

A ViT trained from scratch needs far more data and steps than a CPU demo has (our 4-layer ViT stays below 45%
after 30 epochs here); configs/brisc_vit_scratch.py is the from-scratch ViT for real data.
"""

from jaxmed.config import base_config

IMAGE_SIZE = 64


def get_config():
    config = base_config()
    config.data.format = "synthetic"
    config.data.synthetic.size = 96
    config.data.cache_size = 80
    config.model.name = "resnet"
    config.model.hf_config = dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                                  layer_type="basic")
    # resize the whole image to 64² (no centre crop: the phantoms' lesions can sit near the edge)
    config.model.preprocessor = dict(image_processor_type="ViTImageProcessor",
                                     size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config.train.epochs = 8
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_ratio = 0.05
    config.optim.schedule = "cosine"
    config.mesh.data = 1  # one device: on a CPU, splitting these small batches 8 ways only adds overhead
    return config
