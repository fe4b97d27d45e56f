"""ViT parity with HF PyTorch: logits, hidden states, attentions, position interpolation, gradients."""

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_utils import assert_grads_close, images, jax_grads, nhwc, save_hf, torch_grads, torch_logits
from jaxmed.convert import from_pretrained

SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32,
             patch_size=8, num_labels=5)


def _hf(tmp_path, seed=0, **config):
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**config)).eval()
    return model, from_pretrained(save_hf(model, tmp_path / "hf"))


@pytest.mark.parametrize("config", [
    SMALL,
    dict(SMALL, qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-6, patch_size=4, num_labels=2),
    dict(SMALL, image_size=48, patch_size=16, num_channels=3, hidden_act="relu", num_attention_heads=2),
])
def test_small_vit_logits(tmp_path, config):
    hf, ours = _hf(tmp_path, **config)
    x = images(3, config["image_size"])
    diff = np.abs(np.asarray(ours(nhwc(x))) - torch_logits(hf, x)).max()
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_vit_base_logits(tmp_path):
    """ViTConfig() has google/vit-base-patch16-224's shapes."""
    hf, ours = _hf(tmp_path, num_labels=1000)
    x = images(2, 224)
    diff = np.abs(np.asarray(ours(nhwc(x))) - torch_logits(hf, x)).max()
    assert diff <= 1e-4, diff


def test_hidden_states_and_attentions(tmp_path):
    hf, ours = _hf(tmp_path, **SMALL)
    hf.set_attn_implementation("eager")  # sdpa returns no attention weights
    x = images(2, 32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), output_hidden_states=True, output_attentions=True)
    out = ours.forward(nhwc(x), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == SMALL["num_hidden_layers"] + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert np.abs(np.asarray(a) - b.numpy()).max() <= 1e-4
    assert len(out.attentions) == len(ref.attentions)
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == tuple(b.shape)  # (batch, heads, tokens, tokens)
        assert np.abs(np.asarray(a) - b.numpy()).max() <= 1e-5
        np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("size", [48, 24, 64])
def test_position_interpolation(tmp_path, size):
    """A different input size interpolates like HF's interpolate_pos_encoding (torch bicubic, a=-0.75)."""
    hf, ours = _hf(tmp_path, **SMALL)
    x = images(2, size)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), interpolate_pos_encoding=True).logits.numpy()
    diff = np.abs(np.asarray(ours(nhwc(x))) - ref).max()
    assert diff <= 1e-4, diff


def test_gradients_match_pytorch(tmp_path):
    hf, ours = _hf(tmp_path, **SMALL)
    x, labels = images(4, 32, seed=1), np.array([0, 1, 2, 4])
    ref_loss, ref_grads = torch_grads(hf, x, labels, tmp_path / "hf")
    loss, grads = jax_grads(ours, x, labels)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert_grads_close(grads, ref_grads)


def test_eval_and_train_modes_switch_dropout(tmp_path):
    hf, ours = _hf(tmp_path, **dict(SMALL, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.3))
    x = nhwc(images(2, 32))
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ours(x)))  # eval: deterministic
    ours.train()
    first, second = np.asarray(ours(x)), np.asarray(ours(x))
    assert np.abs(first - second).max() > 1e-3  # dropout active and fresh each call
    ours.eval()
    diff = np.abs(np.asarray(ours(x)) - torch_logits(hf, images(2, 32))).max()
    assert diff <= 1e-4
