"""SAE ⇄ its HF-style directory (see jaxmed/models/sae.py): torch nn.Linear keys, no base model to strip.

"SAEForImageClassification" names the architecture in config.json; transformers has no such class and cannot open
the directory — jaxmed.models.from_pretrained / save_pretrained round-trip it.
"""

from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="SAEForImageClassification",
    base_prefix="",  # a flat checkpoint: encoders.*, decoders.*, classifier.*
)

# ViTImageProcessor-style: resize to image_size² (64 by default; configs override "size" with the model's side)
PREPROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 64, "width": 64},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
