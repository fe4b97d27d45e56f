"""EfficientNet ⇄ HF `EfficientNetForImageClassification`: names mirror the checkpoint; the pooler has no weights."""

from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="EfficientNetForImageClassification",
    base_prefix="efficientnet",
)

# google/efficientnet-b0's preprocessor_config.json. Note include_top: HF's processor divides by image_std a
# second time (normalize(mean=0, std=image_std)) after the usual normalisation; the hub weights expect that.
PREPROCESSOR = {
    "image_processor_type": "EfficientNetImageProcessor",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 0,
    "do_center_crop": False,
    "crop_size": {"height": 289, "width": 289},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "rescale_offset": False,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.47853944, 0.4732864, 0.47434163],
    "include_top": True,
}
