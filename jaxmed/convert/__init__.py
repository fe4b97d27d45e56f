"""HF ⇄ Flax conversion: one table per architecture, keyed by HF `model_type`."""

from jaxmed.convert import resnet, vit

# model_type → (Table, default preprocessor_config.json)
TABLES = {
    "vit": (vit.TABLE, vit.PREPROCESSOR),
    "resnet": (resnet.TABLE, resnet.PREPROCESSOR),
}
