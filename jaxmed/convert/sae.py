"""SAE ⇄ its HF-style directory (see jaxmed/models/sae.py): torch nn.Linear keys, no base model to strip.

"SAEForImageClassification" names the architecture in config.json; transformers has no such class and cannot open
the directory — jaxmed.models.from_pretrained / save_pretrained round-trip it.
"""

from jaxmed.convert import vit
from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="SAEForImageClassification",
    base_prefix="",  # a flat checkpoint: encoders.*, decoders.*, classifier.*
)

# ViTImageProcessor-style: resize to image_size² (64 by default; configs override "size" with the model's side)
PREPROCESSOR = dict(vit.PREPROCESSOR, size={"height": 64, "width": 64})
