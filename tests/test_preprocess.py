"""Our preprocessing equals the HF image processors on real-sized JPEGs (mean-abs target ≤ 1e-3)."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from jaxmed.convert import TABLES
from jaxmed.data.preprocess import Preprocessor
from jaxmed.errors import JaxmedError

EFFICIENTNET = {  # google/efficientnet-b0's preprocessor_config.json
    "image_processor_type": "EfficientNetImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
    "resample": 0, "do_center_crop": False, "crop_size": {"height": 289, "width": 289}, "do_rescale": True,
    "rescale_factor": 1 / 255, "rescale_offset": False, "do_normalize": True, "include_top": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.47853944, 0.4732864, 0.47434163],
}
CONFIGS = {name: preprocessor for name, (_, preprocessor) in TABLES.items()} | {"efficientnet": EFFICIENTNET}


def _jpeg(height, width, seed):
    """A smooth MRI-like JPEG decoded back: the kind of input users have, not white noise."""
    rng = np.random.RandomState(seed)
    small = (rng.rand(height // 16 + 2, width // 16 + 2, 3) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(512, 512), (384, 700), (1000, 380), (150, 120)])
def test_matches_hf_processor(tmp_path, name, shape):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIGS[name]))
    reference = AutoImageProcessor.from_pretrained(str(tmp_path))
    ours = Preprocessor.from_pretrained(tmp_path)
    image = _jpeg(*shape, seed=shape[0])
    expected = reference(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = ours(image)
    assert got.shape == expected.shape == (*ours.output_size(*shape), 3)
    assert np.abs(got - expected).mean() <= 1e-6
    assert np.abs(got - expected).max() <= 1e-5


def test_geometry_keeps_uint8_and_normalize_is_separate():
    ours = Preprocessor.from_config(CONFIGS["resnet"])
    pixels = ours.geometry(_jpeg(300, 400, 0))
    assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
    np.testing.assert_allclose(ours.normalize(pixels[None])[0], ours(_jpeg(300, 400, 0)), atol=1e-6)


def test_grayscale_input_becomes_three_channels():
    gray = np.asarray(_jpeg(256, 256, 1).convert("L"))
    out = Preprocessor.from_config(CONFIGS["vit"])(gray)
    assert out.shape == (224, 224, 3)
    np.testing.assert_allclose(out[..., 0], out[..., 2])


def test_unknown_processor_is_an_error():
    with pytest.raises(JaxmedError, match="not supported"):
        Preprocessor.from_config({"image_processor_type": "SiglipImageProcessor"})
