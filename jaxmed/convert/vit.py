"""ViT ⇄ HF `ViTForImageClassification`: names mirror the checkpoint, so only the unused pooler is listed."""

from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="ViTForImageClassification",
    base_prefix="vit",
    ignore_hf=(r"vit\.pooler\..*",),  # ViTModel checkpoints (e.g. in21k) carry a pooler the classifier never uses
)

# google/vit-base-patch16-224's preprocessor_config.json
PREPROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
