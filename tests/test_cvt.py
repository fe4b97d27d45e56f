"""CvT parity with HF PyTorch: eval and train forwards, BatchNorm statistics, gradients, round trips, new heads."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForImageClassification, CvtConfig, CvtForImageClassification

from helpers_models import (check_bit_identical_round_trip, check_train_step, eval_forward, max_diff,
                            randomize_statistics, randomize_weights, save_hf)
from hf_utils import images, nhwc
from jaxmed.convert import TABLES, from_pretrained, save_pretrained
from jaxmed.convert.core import to_hf
from jaxmed.convert.hub import flat_weights
from jaxmed.models import CvT
from jaxmed.models.cvt import DropPath, torch_avg_pool_ceil

# Two stages of widths 16/32 on 64² images (grids 16², 8²): every per-stage code path, including a stage fed by
# another, at a fraction of CvT-13's compile time. Stage lists have one entry per stage because HF's head reads
# `cls_token[-1]`. The configs share widths so that parameter shapes, and the XLA programs that initialise them,
# repeat.
SMALL = dict(embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2], mlp_ratio=[4.0, 2.0], patch_sizes=[7, 3],
             patch_stride=[4, 2], patch_padding=[2, 1], qkv_bias=[True, True], cls_token=[False, True],
             qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2],
             padding_q=[1, 1], stride_q=[1, 1], drop_rate=[0.0, 0.0], attention_drop_rate=[0.0, 0.0],
             drop_path_rate=[0.0, 0.0], num_labels=5)
CONFIGS = {
    # A cls token in the last stage only (CvT-13's layout); stage 0 uses the original CvT's parameter-free "avg"
    # key/value pooling in ceil mode (16² → 9²; HF builds no module for it, see _patch_avg_projections).
    "cls-avg": dict(SMALL, qkv_projection_method=["avg", "dw_bn"]),
    # No cls token: the head mean-pools all tokens; other kernels/strides/paddings, keys at stride 1, no qkv bias.
    "no-cls": dict(SMALL, cls_token=[False, False], patch_sizes=[5, 3], patch_stride=[3, 2], patch_padding=[1, 1],
                   kernel_qkv=[5, 3], padding_q=[2, 1], padding_kv=[2, 0], stride_kv=[1, 2], qkv_bias=[False, True]),
}
SIZE = 64


def _patch_avg_projections(model: CvtForImageClassification) -> None:
    """Give HF's "avg" layers the original CvT's modules (HF's port omits them and fails in forward)."""
    config = model.config
    for index, stage in enumerate(model.cvt.encoder.stages):
        if config.qkv_projection_method[index] != "avg":
            continue
        for layer in stage.layers:
            attention = layer.attention.attention
            attention.convolution_projection_query.convolution_projection = torch.nn.Identity()
            for projection in (attention.convolution_projection_key, attention.convolution_projection_value):
                projection.convolution_projection = torch.nn.AvgPool2d(
                    config.kernel_qkv[index], config.stride_kv[index], config.padding_kv[index], ceil_mode=True)


def _torch_forward(model: CvtForImageClassification, pixels: torch.Tensor):
    # HF reads `outputs[1]` as the cls token even when the last stage has none; that index only exists when
    # hidden states are returned, so without them a CvT with cls_token[-1]=False raises IndexError.
    return model(pixels, output_hidden_states=True)


def _torch_logits(model: CvtForImageClassification, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _torch_forward(model, torch.from_numpy(x)).logits.numpy()


def _hf_model(config: dict, seed: int = 0) -> CvtForImageClassification:
    torch.manual_seed(seed)
    model = CvtForImageClassification(CvtConfig(**config)).eval()
    _patch_avg_projections(model)
    randomize_weights(model, seed)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def small(request, tmp_path_factory):
    """(HF model, its saved directory) per small config, built once for the module."""
    model = _hf_model(CONFIGS[request.param])
    return model, save_hf(model, tmp_path_factory.mktemp(request.param))


def test_avg_pool_matches_torch():
    x = np.random.RandomState(0).randn(2, 3, 9, 8).astype(np.float32)
    for kernel, stride, padding in [(3, 2, 1), (3, 1, 1), (2, 2, 0), (3, 2, 0), (5, 3, 2), (1, 2, 0)]:
        ref = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)(torch.from_numpy(x)).numpy()
        ours = np.asarray(torch_avg_pool_ceil(nhwc(x), kernel, stride, padding))
        assert ours.shape == ref.transpose(0, 2, 3, 1).shape, (kernel, stride, padding)
        assert max_diff(ours, ref.transpose(0, 2, 3, 1)) <= 1e-6


def test_eval_logits_hidden_states_attentions(small):
    hf, directory = small
    ours = from_pretrained(directory)
    x = images(2, SIZE)
    with torch.no_grad():
        ref = _torch_forward(hf, torch.from_numpy(x))
    out = eval_forward(ours, nhwc(x))
    diff = max_diff(out.logits, ref.logits)
    print(f"eval logits max-abs-diff {diff:.2e} (|logits| ≤ {float(ref.logits.abs().max()):.2f})")
    assert diff <= 1e-4
    for ours_grid, ref_grid in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert max_diff(ours_grid, ref_grid.numpy().transpose(0, 2, 3, 1)) <= 1e-4
    config = hf.config
    assert len(out.attentions) == sum(config.depth)
    assert out.attentions[0].shape[:2] == (2, config.num_heads[0])
    np.testing.assert_allclose(np.asarray(out.attentions[-1]).sum(-1), 1.0, atol=1e-5)


def test_train_mode_forward_statistics_and_gradients(small):
    """One train-mode step against `model.train()` in PyTorch: logits, updated BatchNorm state, every gradient."""
    hf, directory = small
    labels = np.array([0, 1, 2, 2]) % hf.config.num_labels
    result = check_train_step(copy.deepcopy(hf), from_pretrained(directory), images(4, SIZE, seed=1), labels,
                              forward=_torch_forward)
    print(result)


def test_hf_to_jaxmed_to_hf_is_bit_identical(small, tmp_path):
    check_bit_identical_round_trip(small[1], tmp_path / "out")


def test_jaxmed_export_opens_in_transformers(small, tmp_path):
    """A model initialised by jaxmed (statistics randomised) gives the same logits once in transformers."""
    ours = CvT(from_pretrained(small[1]).config, rngs=nnx.Rngs(3))
    randomize_statistics(ours)
    save_pretrained(ours, tmp_path / "export")
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / "export")).eval()
    assert isinstance(hf, CvtForImageClassification)
    _patch_avg_projections(hf)
    # Reloading gives the same weights and reuses the fixture models' compiled forward.
    reloaded = from_pretrained(tmp_path / "export")
    saved, loaded = flat_weights(ours), flat_weights(reloaded)
    assert saved.keys() == loaded.keys() and all(np.array_equal(saved[k], loaded[k]) for k in saved)
    x = images(2, SIZE)
    diff = max_diff(eval_forward(reloaded, nhwc(x)).logits, _torch_logits(hf, x))
    print(f"jaxmed → transformers logits max-abs-diff {diff:.2e}")
    assert diff <= 1e-4


def test_new_head_is_reinitialised(small):
    hf, directory = small
    ours = from_pretrained(directory, num_labels=4)
    assert ours.config.num_labels == 4 and ours.classifier.kernel[...].shape == (hf.config.embed_dim[-1], 4)
    reference = {k: v.numpy() for k, v in hf.state_dict().items()}
    for key, value in to_hf(flat_weights(ours), TABLES["cvt"][0]).items():
        if not key.startswith("classifier."):
            assert np.array_equal(value, reference[key]), key
    assert not np.allclose(ours.classifier.kernel[...], reference["classifier.weight"][:4].T)


def test_drop_path_rates_and_modes():
    """Stage i's layers all take linspace(0, rate, depth)[i] (HF's indexing); train()/eval() switch them."""
    config = CvtConfig(**dict(SMALL, drop_path_rate=[0.5, 0.3], drop_rate=[0.1, 0.1]))
    model = nnx.eval_shape(lambda: CvT(config, rngs=nnx.Rngs(0)))
    stages = model.cvt.encoder.stages
    assert [layer.drop_path.rate for s in stages for layer in s.layers] == pytest.approx([0.0, 0.3, 0.3])
    model.eval()
    assert all(layer.drop_path.deterministic for s in stages for layer in s.layers)
    model.train()
    assert not any(layer.drop_path.deterministic for s in stages for layer in s.layers)
    assert not stages[0].embedding.dropout.deterministic


def test_drop_path_drops_whole_samples():
    drop = DropPath(0.5, rngs=nnx.Rngs(0))
    per_sample = np.asarray(drop(jnp.ones((256, 3, 4)))).reshape(256, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0} and (per_sample == per_sample[:, :1]).all()
    assert 0.35 < (per_sample[:, 0] > 0).mean() < 0.65
    drop.eval()
    assert (np.asarray(drop(jnp.ones((4, 3)))) == 1).all()


@pytest.mark.slow
def test_cvt13_parity_and_round_trip(tmp_path):
    """CvtConfig() has microsoft/cvt-13's shapes; two 224² images, random weights and statistics."""
    torch.manual_seed(0)
    hf = CvtForImageClassification(CvtConfig(num_labels=1000)).eval()
    randomize_weights(hf, gain=1.0)
    directory = save_hf(hf, tmp_path / "hf")
    ours = from_pretrained(directory)
    x = images(2, 224)
    ref = _torch_logits(hf, x)
    diff = max_diff(eval_forward(ours, nhwc(x)).logits, ref)
    print(f"cvt-13 eval logits max-abs-diff {diff:.2e} (|logits| ≤ {np.abs(ref).max():.2f})")
    assert diff <= 1e-4
    check_bit_identical_round_trip(directory, tmp_path / "out")
