"""The conversion tables, one per architecture, keyed by HF `model_type`."""

from jaxmed.convert import cvt, efficientnet, resnet, sae, vit

# model_type → (Table, default preprocessor_config.json)
TABLES = {
    "vit": (vit.TABLE, vit.PREPROCESSOR),
    "resnet": (resnet.TABLE, resnet.PREPROCESSOR),
    "cvt": (cvt.TABLE, cvt.PREPROCESSOR),
    "efficientnet": (efficientnet.TABLE, efficientnet.PREPROCESSOR),
    "jaxmed_sae": (sae.TABLE, sae.PREPROCESSOR),
}
