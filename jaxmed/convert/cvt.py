"""CvT ⇄ HF `CvtForImageClassification`: names mirror the checkpoint, so the table only names the head."""

from jaxmed.convert import resnet
from jaxmed.convert.core import Table

TABLE = Table(
    hf_class="CvtForImageClassification",
    base_prefix="cvt",
    # The final LayerNorm belongs to the classification model, not CvtModel: a backbone-only checkpoint lacks it,
    # so it is re-initialised like the classifier instead of refusing the checkpoint.
    head=("classifier", "layernorm"),
)

# microsoft/cvt-13's preprocessor_config.json is microsoft/resnet-50's: shortest edge to 224/0.875, centre-crop
# 224, ImageNet mean/std.
PREPROCESSOR = dict(resnet.PREPROCESSOR)
