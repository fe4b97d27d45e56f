"""ResNet ⇄ HF `ResNetForImageClassification`: HF's head is `Sequential(Flatten, Linear)`, hence `classifier.1`."""

from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="ResNetForImageClassification",
    base_prefix="resnet",
    renames=(("classifier", "classifier.1"),),
    ignore_hf=(r"resnet\.pooler\..*",),
)

# microsoft/resnet-50's preprocessor_config.json
PREPROCESSOR = {
    "image_processor_type": "ConvNextImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}
