"""The stress test's corruptions: each hurts more with severity, reproduces itself by seed, keeps grayscale images
grayscale, and leaves severity 0 untouched."""

import numpy as np
import pytest

from jaxmed.data import synthetic
from jaxmed.stress import corruptions as jcorrupt


@pytest.fixture(scope="module")
def phantoms():
    images = synthetic.generate("test", 2, 48, 1)[0]
    return np.repeat(images[..., None], 3, axis=-1)


@pytest.mark.parametrize("name", list(jcorrupt.BY_NAME))
def test_each_corruption_grows_with_severity(phantoms, name):
    corruption = jcorrupt.BY_NAME[name]
    changes = [np.abs(jcorrupt.corrupt(phantoms, corruption, severity, 0).astype(float) - phantoms).mean()
               for severity in (0, *jcorrupt.SEVERITIES)]
    assert changes[0] == 0
    assert all(b > a for a, b in zip(changes, changes[1:])), (name, changes)
    again = jcorrupt.corrupt(phantoms, corruption, 3, 0)
    assert np.array_equal(again, jcorrupt.corrupt(phantoms, corruption, 3, 0))
    assert np.array_equal(again[..., 0], again[..., 2])  # grayscale stays grayscale


def test_colour_images_are_corrupted_per_channel_and_bad_severity_is_refused(phantoms):
    colour = phantoms.copy()
    colour[..., 1] //= 2
    out = jcorrupt.corrupt(colour, jcorrupt.BY_NAME["gaussian_noise"], 2, 0)
    assert not np.array_equal(out[..., 0], out[..., 1])
    with pytest.raises(ValueError, match="severity 6"):
        jcorrupt.corrupt(phantoms, jcorrupt.BY_NAME["blur"], 6, 0)
