"""EfficientNet parity with HF PyTorch: eval and train forwards, BatchNorm statistics, gradients, round trips."""

import copy

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (AutoModelForImageClassification, EfficientNetConfig,
                          EfficientNetForImageClassification)

from helpers_models import (check_bit_identical_round_trip, check_train_step, eval_forward, max_diff,
                            randomize_statistics, randomize_weights, save_hf)
from hf_utils import images, nhwc
from jaxmed.convert import TABLES, from_pretrained, save_pretrained
from jaxmed.convert.core import to_hf
from jaxmed.convert.hub import flat_weights
from jaxmed.models import EfficientNet
from jaxmed.models.efficientnet import round_filters

# google/efficientnet-b0. HF's config default hidden_dim (2560) is B7's; B0's top conv has 1280 channels.
B0 = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, dropout_rate=0.2, hidden_dim=1280)

# Two stages at half width (stem 16 channels; blocks: no expansion, stride 2, residual; top conv 640). No dropout,
# so train mode is deterministic.
SMALL = dict(width_coefficient=0.5, depth_coefficient=1.0, image_size=64, in_channels=[32, 16], out_channels=[16, 24],
             kernel_sizes=[3, 5], strides=[1, 2], num_block_repeats=[1, 2], expand_ratios=[1, 6], hidden_dim=640,
             dropout_rate=0.0, drop_connect_rate=0.0, num_labels=5)
CONFIGS = {
    "small": (SMALL, 64),
    # Odd input (63²), so the stride-2 padding decides the shapes; square instead of adjusted padding for the
    # stride-2 block; an even depthwise kernel (torch pads 'same' 1 then 2); max pooling; another activation,
    # momentum and eps. Widths as in "small", so most parameter shapes (and their init programs) repeat.
    "odd": (dict(SMALL, kernel_sizes=[3, 4], depthwise_padding=[1], pooling_type="max", hidden_act="gelu",
                 batch_norm_momentum=0.3, batch_norm_eps=1e-5), 63),
}


def _hf_model(config: dict, seed: int = 0) -> EfficientNetForImageClassification:
    torch.manual_seed(seed)
    model = EfficientNetForImageClassification(EfficientNetConfig(**config)).eval()
    randomize_weights(model, seed, gain=1.0)
    return model


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def small(request, tmp_path_factory):
    """(HF model, its saved directory, image size) per small config, built once for the module."""
    config, size = CONFIGS[request.param]
    model = _hf_model(config)
    return model, save_hf(model, tmp_path_factory.mktemp(request.param)), size


def test_eval_logits_and_hidden_states(small):
    hf, directory, size = small
    ours = from_pretrained(directory)
    x = images(2, size)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), output_hidden_states=True)
    out = eval_forward(ours, nhwc(x))
    diff = max_diff(out.logits, ref.logits)
    print(f"eval logits max-abs-diff {diff:.2e} (|logits| ≤ {float(ref.logits.abs().max()):.2f})")
    assert diff <= 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states) == len(ours.efficientnet.encoder.blocks) + 1
    for ours_map, ref_map in zip(out.hidden_states, ref.hidden_states, strict=True):
        scale = max(1.0, float(ref_map.abs().max()))
        assert max_diff(ours_map, ref_map.numpy().transpose(0, 2, 3, 1)) <= 1e-5 * scale


def test_train_mode_forward_statistics_and_gradients(small):
    """One train-mode step against `model.train()` in PyTorch: logits, updated BatchNorm state, every gradient."""
    hf, directory, size = small
    result = check_train_step(copy.deepcopy(hf), from_pretrained(directory), images(4, size, seed=1),
                              np.array([0, 1, 2, 4]))
    print(result)


def test_hf_to_jaxmed_to_hf_is_bit_identical(small, tmp_path):
    check_bit_identical_round_trip(small[1], tmp_path / "out")


def test_jaxmed_export_opens_in_transformers(small, tmp_path):
    """A model initialised by jaxmed (statistics randomised) gives the same logits once in transformers."""
    _, directory, size = small
    ours = EfficientNet(from_pretrained(directory).config, rngs=nnx.Rngs(3))
    randomize_statistics(ours)
    save_pretrained(ours, tmp_path / "export")
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / "export")).eval()
    assert isinstance(hf, EfficientNetForImageClassification)
    # Reloading gives the same weights and reuses the fixture models' compiled forward.
    reloaded = from_pretrained(tmp_path / "export")
    saved, loaded = flat_weights(ours), flat_weights(reloaded)
    assert saved.keys() == loaded.keys() and all(np.array_equal(saved[k], loaded[k]) for k in saved)
    x = images(2, size)
    diff = max_diff(eval_forward(reloaded, nhwc(x)).logits, _torch_logits(hf, x))
    print(f"jaxmed → transformers logits max-abs-diff {diff:.2e}")
    assert diff <= 1e-4


def test_new_head_is_reinitialised(small):
    hf, directory, _ = small
    ours = from_pretrained(directory, num_labels=4)
    assert ours.config.num_labels == 4 and ours.classifier.kernel[...].shape == (hf.config.hidden_dim, 4)
    reference = {k: v.numpy() for k, v in hf.state_dict().items()}
    for key, value in to_hf(flat_weights(ours), TABLES["efficientnet"][0]).items():
        if not key.startswith("classifier."):
            assert np.array_equal(value, reference[key]), key


def test_dropout_rates_and_modes():
    """HF's "drop connect" is element-wise dropout in blocks after a stage's first, at rate·block/blocks."""
    config = EfficientNetConfig(**dict(SMALL, dropout_rate=0.3, drop_connect_rate=0.2))
    model = nnx.eval_shape(lambda: EfficientNet(config, rngs=nnx.Rngs(0)))
    blocks = model.efficientnet.encoder.blocks
    assert [b.projection.apply_dropout for b in blocks] == [False, False, True]
    assert [b.projection.dropout.rate for b in blocks] == pytest.approx([0.2 * i / 3 for i in range(3)])
    model.train()
    assert not model.dropout.deterministic and not blocks[2].projection.dropout.deterministic
    assert not blocks[0].depthwise_conv.depthwise_norm.use_running_average
    model.eval()
    assert model.dropout.deterministic and blocks[2].projection.dropout.deterministic
    assert blocks[0].depthwise_conv.depthwise_norm.use_running_average


def test_b7_sized_hidden_dim_is_refused_with_the_fix():
    config = EfficientNetConfig(**dict(B0, hidden_dim=2560))
    with pytest.raises(ValueError, match="hidden_dim=1280"):
        nnx.eval_shape(lambda: EfficientNet(config, rngs=nnx.Rngs(0)))
    assert round_filters(config, 1280) == 1280


@pytest.mark.slow
def test_b0_parity_and_round_trip(tmp_path):
    """EfficientNet-B0 shapes (about 4 M parameters with 2 labels); two 224² images, random statistics."""
    hf = _hf_model(dict(B0, num_labels=1000))
    directory = save_hf(hf, tmp_path / "hf")
    ours = from_pretrained(directory)
    x = images(2, 224)
    ref = _torch_logits(hf, x)
    diff = max_diff(eval_forward(ours, nhwc(x)).logits, ref)
    print(f"b0 eval logits max-abs-diff {diff:.2e} (|logits| ≤ {np.abs(ref).max():.2f})")
    assert diff <= 1e-4
    check_bit_identical_round_trip(directory, tmp_path / "out")
