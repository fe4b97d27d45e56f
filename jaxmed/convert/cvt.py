"""CvT ⇄ HF `CvtForImageClassification`: names mirror the checkpoint, so the table only names the head."""

from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="CvtForImageClassification",
    base_prefix="cvt",
    # The final LayerNorm belongs to the classification model, not CvtModel: a backbone-only checkpoint lacks it,
    # so it is re-initialised like the classifier instead of refusing the checkpoint.
    head=("classifier", "layernorm"),
)

# microsoft/cvt-13's preprocessor_config.json: resize the shortest edge to 224/0.875, centre-crop 224.
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
