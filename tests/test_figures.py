"""Figures: every function writes a real, non-blank PNG; training curves from metrics.jsonl; errors for people."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxmed.evaluate import figures
from jaxmed.errors import JaxmedError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 5, f"{path} is blank"
    return pixels


def _classifier(num_examples, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_examples)
    probabilities = rng.dirichlet(np.ones(num_classes), num_examples)
    probabilities[np.arange(num_examples), labels] += 0.4
    return labels, probabilities / probabilities.sum(1, keepdims=True)


def _names(num_classes):
    return [f"class_{i}" for i in range(num_classes)]


def _red_pixels(pixels):
    red, green, blue = (pixels[..., c].astype(int) for c in range(3))
    return int(((red > 180) & (green < 80) & (blue < 80)).sum())


@pytest.fixture(autouse=True)
def no_pyplot_figures_left_open():
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


@pytest.mark.parametrize("num_classes", [2, 4, 15])
def test_confusion_matrix(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    matrix = rng.integers(0, 30, (num_classes, num_classes))
    matrix[0] = 0  # a class with no examples must not divide by zero
    path = tmp_path / "nested" / "confusion.png"
    figures.confusion_matrix(matrix, _names(num_classes), path)
    _assert_png(path)


@pytest.mark.parametrize("num_classes", [2, 4, 15])
def test_roc_and_pr_curves(tmp_path, num_classes):
    labels, probabilities = _classifier(300, num_classes, seed=num_classes)
    figures.roc_curves(labels, probabilities, _names(num_classes), tmp_path / "roc.png")
    figures.pr_curves(labels, probabilities, _names(num_classes), tmp_path / "pr.png")
    _assert_png(tmp_path / "roc.png")
    _assert_png(tmp_path / "pr.png")


def test_curves_with_a_class_absent(tmp_path):
    labels, probabilities = _classifier(100, 3)
    labels[labels == 2] = 0
    figures.roc_curves(labels, probabilities, _names(3), tmp_path / "roc.png")
    figures.pr_curves(labels, probabilities, _names(3), tmp_path / "pr.png")
    _assert_png(tmp_path / "roc.png")
    _assert_png(tmp_path / "pr.png")


def test_curves_reject_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        figures.roc_curves([0, 1, 1], np.full((3, 4), 0.25), _names(2), tmp_path / "roc.png")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _training_log(steps=60, eval_every=20, with_val=True):
    rows = []
    for step in range(10, steps + 1, 10):
        rows.append({"step": step, "train/loss": 1.4 / step ** 0.3, "train/lr": 1e-3 * (1 - step / steps),
                     "train/accuracy": 1 - 0.7 / step ** 0.3, "train/grad_norm": 1.0})
        if with_val and step % eval_every == 0:
            rows.append({"step": step, "val/loss": 1.3 / step ** 0.25, "val/accuracy": 0.3 + step / 100,
                         "val/balanced_accuracy": 0.3 + step / 110, "val/f1_macro": 0.25 + step / 120,
                         "val/recall/glioma": 0.4 + step / 200, "val/recall/no_tumor": 0.2 + step / 100})
    return rows


def test_training_curves(tmp_path):
    rows = _training_log()
    rows.append(rows[-1])  # a resumed run logs a step twice
    _write_jsonl(tmp_path / "metrics.jsonl", rows)
    figures.training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    full = _assert_png(tmp_path / "curves.png")

    _write_jsonl(tmp_path / "train_only.jsonl", _training_log(with_val=False))
    figures.training_curves(tmp_path / "train_only.jsonl", tmp_path / "train_only.png")
    train_only = _assert_png(tmp_path / "train_only.png")
    # One panel fewer (no per-class recall): two panels a row, so the last quarter of the grid stays blank.
    def ink_in_last_quarter(image):
        height, width = image.shape[:2]
        corner = np.asarray(image)[height // 2 + 10:, width // 2 + 10:, :3].astype(float)
        return np.mean(corner.max(-1) - corner.min(-1) > 30) + np.mean(corner.mean(-1) < 200)
    assert train_only.shape == full.shape
    assert ink_in_last_quarter(train_only) < 0.001 < ink_in_last_quarter(full)


def test_training_curves_without_lr_or_loss(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": 5, "val/accuracy": 0.5}, {"step": 10, "val/accuracy": 0.6}])
    figures.training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png", min_bytes=2_000)


def test_training_curves_errors(tmp_path):
    with pytest.raises(JaxmedError, match="no metrics file at"):
        figures.training_curves(tmp_path / "missing.jsonl", tmp_path / "curves.png")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(JaxmedError, match="has no metrics"):
        figures.training_curves(tmp_path / "empty.jsonl", tmp_path / "curves.png")
    (tmp_path / "broken.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "tra\n')
    with pytest.raises(JaxmedError, match="broken.jsonl:2 is not JSON"):
        figures.training_curves(tmp_path / "broken.jsonl", tmp_path / "curves.png")
    _write_jsonl(tmp_path / "other.jsonl", [{"step": 1, "something/else": 1.0}])
    with pytest.raises(JaxmedError, match="something/else"):
        figures.training_curves(tmp_path / "other.jsonl", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def _grey_images(count, size=48, channel_axis=False):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
    return images[..., None] if channel_axis else images


@pytest.mark.parametrize("layout", ["HxW", "HxWx1", "HxWx3"])
def test_predictions_grid_marks_mistakes_in_red(tmp_path, layout):
    count = 6
    images = _grey_images(count, channel_axis=layout == "HxWx1")
    if layout == "HxWx3":
        images = np.repeat(images[..., None], 3, axis=-1)
    labels = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.full((count, 3), 0.2)
    correct = labels.copy()
    probabilities[np.arange(count), correct] = 0.6
    figures.predictions_grid(images, labels, correct, probabilities, ["glioma", "meningioma", "pituitary"],
                             tmp_path / "right.png")
    wrong = (labels + 1) % 3
    figures.predictions_grid(images, labels, wrong, probabilities, ["glioma", "meningioma", "pituitary"],
                             tmp_path / "wrong.png")
    # Grey images hold no red, so red pixels come from the mistakes' titles and frames only.
    assert _red_pixels(_assert_png(tmp_path / "right.png")) == 0
    assert _red_pixels(_assert_png(tmp_path / "wrong.png")) > 500


def test_predictions_grid_shows_at_most_max_images(tmp_path):
    images = _grey_images(40, size=32)
    labels = np.zeros(40, dtype=int)
    probabilities = np.tile([0.9, 0.1], (40, 1))
    figures.predictions_grid(images, labels, labels, probabilities, ["a", "b"], tmp_path / "four.png", max_images=4)
    figures.predictions_grid(images, labels, labels, probabilities, ["a", "b"], tmp_path / "sixteen.png")
    four, sixteen = _assert_png(tmp_path / "four.png"), _assert_png(tmp_path / "sixteen.png")
    assert four.shape[0] < sixteen.shape[0] and four.shape[1] < sixteen.shape[1]


def test_overlay(tmp_path):
    images = [_grey_images(1, size=64)[0], np.zeros((80, 60, 3), dtype=np.uint8)]
    heatmaps = [np.random.default_rng(1).random((14, 14)), np.eye(7)]
    figures.overlay(images, heatmaps, ["rollout", "grad-cam"], tmp_path / "overlay.png")
    _assert_png(tmp_path / "overlay.png")
    with pytest.raises(ValueError, match="one heatmap and one title per image"):
        figures.overlay(images, heatmaps[:1], ["a", "b"], tmp_path / "bad.png")


def test_resize_heatmap_is_bilinear_and_clipped():
    heatmap = np.array([[0.0, 1.0], [0.0, 1.0]])
    resized = figures.resize_heatmap(heatmap, (4, 8))
    assert resized.shape == (4, 8)
    rows_equal = np.allclose(resized, resized[0])
    assert rows_equal and np.all(np.diff(resized[0]) >= 0) and 0 < resized[0, 3] < 1  # a ramp, not nearest
    assert figures.resize_heatmap(np.full((3, 3), 2.0), (5, 5)).max() == 1.0
