"""Conversion API: round trips both ways, head re-initialisation, weight formats, and errors for people."""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import (AutoImageProcessor, AutoModelForImageClassification, BertConfig, ResNetConfig,
                          ResNetForImageClassification, ViTConfig, ViTForImageClassification, ViTModel)

from hf_utils import images, nhwc, randomize_batchnorm, save_hf, torch_logits
from jaxmed.errors import JaxmedError
from jaxmed.convert import from_pretrained, save_pretrained
from jaxmed.models import ResNet, ViT
from flax import nnx

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
           patch_size=8, num_labels=3)
RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic", num_labels=3)


def _saved(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "vit":
        model = ViTForImageClassification(ViTConfig(**VIT))
    else:
        model = ResNetForImageClassification(ResNetConfig(**RESNET))
        randomize_batchnorm(model)
    return model.eval(), save_hf(model, tmp_path / "hf")


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_hf_to_jaxmed_to_hf_is_bit_identical(tmp_path, kind):
    _, directory = _saved(tmp_path, kind)
    save_pretrained(from_pretrained(directory), tmp_path / "back")
    before, after = load_file(f"{directory}/model.safetensors"), load_file(f"{tmp_path}/back/model.safetensors")
    assert set(before) == set(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and before[key].shape == after[key].shape, key
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_jaxmed_model_opens_in_transformers(tmp_path, kind):
    """A model made and changed in jaxmed (fresh init, BatchNorm statistics updated) exports to HF exactly."""
    if kind == "vit":
        model = ViT(ViTConfig(**VIT), rngs=nnx.Rngs(1))
        size = 32
    else:
        model = ResNet(ResNetConfig(**RESNET), rngs=nnx.Rngs(1))
        model.train()
        model(nhwc(images(4, 48, seed=5)))  # moves running statistics away from 0/1
        model.eval()
        size = 48
    out = save_pretrained(model, tmp_path / "export")
    hf = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    x = images(2, size)
    assert np.abs(np.asarray(model(nhwc(x))) - torch_logits(hf, x)).max() <= 1e-4
    processor = AutoImageProcessor.from_pretrained(str(out))
    assert processor.image_mean and processor.do_normalize
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] and config["label2id"]


def test_export_is_deterministic(tmp_path):
    _, directory = _saved(tmp_path, "resnet")
    model = from_pretrained(directory)
    save_pretrained(model, tmp_path / "a")
    save_pretrained(model, tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_new_num_labels_reinitialises_only_the_head(tmp_path, caplog):
    hf, directory = _saved(tmp_path, "vit")
    labels = {0: "glioma", 1: "meningioma", 2: "no_tumor", 3: "pituitary"}
    with caplog.at_level(logging.WARNING, logger="jaxmed.convert"):
        model = from_pretrained(directory, num_labels=4, id2label=labels)
    assert "re-initialised classifier.bias, classifier.kernel for 4 labels" in caplog.text
    assert model.classifier.kernel.value.shape == (VIT["hidden_size"], 4)
    assert model.config.id2label == labels and model.config.label2id["pituitary"] == 3
    x = images(2, 32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), output_hidden_states=True).hidden_states[-1].numpy()
    ours = model.forward(nhwc(x), output_hidden_states=True).hidden_states[-1]
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4  # the backbone is the checkpoint's
    save_pretrained(model, tmp_path / "four")
    assert AutoModelForImageClassification.from_pretrained(str(tmp_path / "four")).config.id2label[3] == "pituitary"


def test_headless_backbone_checkpoint(tmp_path, caplog):
    """ViTModel checkpoints (like google/vit-base-patch16-224-in21k) have no prefix, a pooler and no head."""
    torch.manual_seed(0)
    backbone = ViTModel(ViTConfig(**VIT)).eval()
    directory = save_hf(backbone, tmp_path / "backbone")
    with caplog.at_level(logging.WARNING, logger="jaxmed.convert"):
        model = from_pretrained(directory, num_labels=2)
    assert "re-initialised" in caplog.text and "unused" not in caplog.text
    x = images(1, 32)
    with torch.no_grad():
        ref = backbone(torch.from_numpy(x), output_hidden_states=True).hidden_states[-1].numpy()
    ours = model.forward(nhwc(x), output_hidden_states=True).hidden_states[-1]
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_pytorch_bin_is_read_weights_only(tmp_path):
    hf, directory = _saved(tmp_path, "resnet")
    tensors = load_file(f"{directory}/model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, f"{directory}/pytorch_model.bin")
    (tmp_path / "hf/model.safetensors").unlink()
    x = images(2, 40)
    assert np.abs(np.asarray(from_pretrained(directory)(nhwc(x))) - torch_logits(hf, x)).max() <= 1e-4


def _one_line_error(call, *fragments):
    with pytest.raises(JaxmedError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert info.value.__cause__ is None  # raised `from None`: no chained traceback from deep inside
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_bad_inputs_are_clear_one_line_errors(tmp_path):
    _one_line_error(lambda: from_pretrained(tmp_path / "does/not/exist"), "no such model directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: from_pretrained(tmp_path / "empty"), "has no config.json")
    BertConfig().save_pretrained(str(tmp_path / "bert"))
    _one_line_error(lambda: from_pretrained(tmp_path / "bert"), "unsupported architecture 'bert'", "resnet", "vit")
    _one_line_error(lambda: from_pretrained("google/vit-base-patch16-224"), "google/vit-base-patch16-224",
                    "could not be fetched", "--local-dir")

    _, directory = _saved(tmp_path, "vit")
    weights = tmp_path / "hf/model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    _one_line_error(lambda: from_pretrained(directory), "corrupted", "model.safetensors")
    weights.write_bytes(b"\x00" * 64)
    _one_line_error(lambda: from_pretrained(directory), "corrupted")
    weights.write_bytes(good)

    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
    _one_line_error(lambda: from_pretrained(directory), "shape mismatch", "vit.encoder.layer.0.intermediate.dense",
                    "expects (80", "has (64")
    (tmp_path / "hf/config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    _one_line_error(lambda: from_pretrained(directory), "lacks weights", "vit.encoder.layer.2")
