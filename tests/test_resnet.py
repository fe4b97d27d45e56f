"""ResNet parity with HF PyTorch: eval logits, train-mode BatchNorm statistics, gradients."""

import numpy as np
import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from hf_utils import (assert_grads_close, images, jax_grads, nhwc, randomize_batchnorm, save_hf, torch_grads,
                      torch_logits)
from jaxmed.convert.hub import flat_weights
from jaxmed.convert import TABLES, from_pretrained
from jaxmed.convert.core import to_hf

BASIC = dict(embedding_size=16, hidden_sizes=[16, 24, 32], depths=[2, 1, 2], layer_type="basic", num_labels=4)
BOTTLENECK = dict(embedding_size=16, hidden_sizes=[32, 48], depths=[2, 2], layer_type="bottleneck", num_labels=3)


def _hf(tmp_path, **config):
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(**config))
    randomize_batchnorm(model)
    model.eval()
    return model, from_pretrained(save_hf(model, tmp_path / "hf"))


@pytest.mark.parametrize("config", [
    BASIC,
    BOTTLENECK,
    dict(BOTTLENECK, downsample_in_bottleneck=True, downsample_in_first_stage=True),
    dict(BASIC, downsample_in_first_stage=True, hidden_act="gelu", num_channels=3),
])
def test_small_resnet_logits(tmp_path, config):
    hf, ours = _hf(tmp_path, **config)
    x = images(2, 40)
    diff = np.abs(np.asarray(ours(nhwc(x))) - torch_logits(hf, x)).max()
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_resnet50_logits(tmp_path):
    """ResNetConfig() has microsoft/resnet-50's shapes."""
    hf, ours = _hf(tmp_path, num_labels=1000)
    x = images(2, 224)
    diff = np.abs(np.asarray(ours(nhwc(x))) - torch_logits(hf, x)).max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("config", [BASIC, BOTTLENECK])
def test_train_mode_forward_and_running_statistics(tmp_path, config):
    hf, ours = _hf(tmp_path, **config)
    x = images(4, 40, seed=3)
    hf.train()
    ours.train()
    for step in range(2):  # two updates: the momentum blend of old and new statistics is exercised
        with torch.no_grad():
            ref = hf(torch.from_numpy(x + step)).logits.numpy()
        out = np.asarray(ours(nhwc(x + step)))
        assert np.abs(out - ref).max() <= 1e-4
    table, _ = TABLES["resnet"]
    ours_state = to_hf(flat_weights(ours), table)
    for key, tensor in hf.state_dict().items():
        if "running" in key or "num_batches_tracked" in key:
            np.testing.assert_allclose(ours_state[key], tensor.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    ours.eval()
    hf.eval()
    assert np.abs(np.asarray(ours(nhwc(x))) - torch_logits(hf, x)).max() <= 1e-4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_match_pytorch(tmp_path, mode):
    hf, ours = _hf(tmp_path, **BOTTLENECK)
    getattr(hf, mode)()
    getattr(ours, mode)()
    x, labels = images(4, 40, seed=1), np.array([0, 1, 2, 1])
    ref_loss, ref_grads = torch_grads(hf, x, labels, tmp_path / "hf")
    loss, grads = jax_grads(ours, x, labels)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert_grads_close(grads, ref_grads)
