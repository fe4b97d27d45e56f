"""Explanation checks (deletion/insertion against random maps, model randomisation, localisation) and the phantoms'
lesion masks they measure against; the pieces against slow textbook versions, then end to end on a trained demo."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from transformers import ResNetConfig

from helpers_configs import config_file
from jaxmed import experiment
from jaxmed.data import masks as jmasks
from jaxmed.data import synthetic
from jaxmed.data.preprocess import Preprocessor
from jaxmed.evaluate import explain, explain_checks
from jaxmed.models import MODELS


def test_phantom_masks_lie_on_the_lesions_and_leave_the_images_unchanged():
    images, labels, planes = synthetic.generate("test", 6, 64, 5)
    same, same_labels, same_planes, masks = synthetic.generate_with_masks("test", 6, 64, 5)
    assert np.array_equal(images, same) and np.array_equal(planes, same_planes)
    area = masks.reshape(len(masks), -1).mean(1)
    assert np.all(area[labels == synthetic.CLASS_NAMES.index("no_tumor")] == 0)
    assert np.all(area[labels != synthetic.CLASS_NAMES.index("no_tumor")] > 0.002)
    # meningioma and pituitary masses are bright and homogeneous: brighter inside the mask than in the ring around it
    import cv2
    for i in np.flatnonzero((labels == 1) | (labels == 3)):
        ring = (cv2.dilate(masks[i].astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~masks[i]
        assert images[i][masks[i]].mean() > images[i][ring].mean() + 10, i


def test_masks_follow_the_eval_geometry(tmp_path):
    """A folder's masks (data.mask_root) go through the processor's resize and crop exactly as their images."""
    root, mask_root = tmp_path / "data", tmp_path / "masks"
    (root / "test" / "tumour").mkdir(parents=True)
    (mask_root / "test" / "tumour").mkdir(parents=True)
    from PIL import Image
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 50:70] = 255
    Image.fromarray(mask).save(mask_root / "test" / "tumour" / "a.png")
    config = config_file("tests/tiny_config.py").data
    config.format, config.root, config.mask_root = "imagefolder", str(root), str(mask_root)
    processor = Preprocessor.from_config({"image_processor_type": "ConvNextImageProcessor",
                                          "size": {"shortest_edge": 32}, "crop_pct": 0.875})
    ids = [str(root / "test" / "tumour" / "a.jpg"), str(root / "test" / "tumour" / "b.jpg")]
    got = jmasks.lesion_masks(config, ids, processor, (32, 32))
    expected = processor.geometry(np.repeat(mask[..., None], 3, -1))[..., 0] >= 128
    assert got.shape == (2, 32, 32) and np.array_equal(got[0], expected) and not got[1].any()
    config.mask_root = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="data.mask_root"):
        jmasks.lesion_masks(config, ids, processor, (32, 32))


def _slow_localisation(saliency, masks, radius):
    hits, shares = [], []
    for s, m in zip(saliency, masks):
        if not m.any():
            continue
        peak = np.unravel_index(np.argmax(s), s.shape)
        ys, xs = np.nonzero(m)
        hits.append(bool(np.min((ys - peak[0]) ** 2 + (xs - peak[1]) ** 2) <= radius ** 2))
        shares.append(s[m].sum() / s.sum())
    return np.mean(hits), np.mean(shares)


def test_localisation_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    masks = np.zeros((12, 40, 40), bool)
    for i in range(10):
        y, x = rng.integers(5, 30, 2)
        masks[i, y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = True
    saliency = rng.random((12, 40, 40)) ** 4
    labels = np.array([0] * 5 + [1] * 5 + [2] * 2)
    result = explain_checks.localisation(saliency, masks, labels, ["a", "b", "none"])
    hit, share = _slow_localisation(saliency, masks, result["tolerance_pixels"])
    assert result["images"] == 10 and result["without_lesion"] == 2 and "none" not in result["per_class"]
    assert result["pointing_game"] == pytest.approx(hit) and result["energy_in_mask"] == pytest.approx(share)
    assert result["pointing_game_ci"][0] <= hit <= result["pointing_game_ci"][1]
    # a map that is the mask itself points inside every time and has all its energy there
    exact = explain_checks.localisation(masks.astype(float) + 1e-9 * saliency, masks, labels, ["a", "b", "none"])
    assert exact["pointing_game"] == 1.0 and exact["energy_in_mask"] > 0.99


def test_deletion_and_insertion_reward_the_map_of_what_the_model_uses():
    """A 'model' whose class-1 probability is the mean brightness of a fixed square: the square's map removes and
    restores that evidence fastest; random maps on the same grid do not."""
    size = 32
    region = np.zeros((size, size), bool)
    region[8:16, 20:28] = True

    def probabilities(pixels):
        evidence = pixels[..., 0][:, region].mean(1)
        return np.stack([1 - evidence, evidence], 1)

    images = np.full((6, size, size, 3), 20, np.uint8)
    images[:, region] = 230  # the evidence: blurring spreads it out, deleting blackens it
    normalise = lambda x: np.asarray(x, np.float32) / 255  # noqa: E731
    targets = np.ones(6, int)
    right = np.broadcast_to(region, (6, size, size)).astype(np.float32)
    random = explain_checks.upsample(np.random.default_rng(1).random((6, 4, 4), dtype=np.float32), (size, size))
    deletion = explain_checks.perturbation_auc(probabilities, normalise, images, right, targets, "deletion")
    deletion_random = explain_checks.perturbation_auc(probabilities, normalise, images, random, targets, "deletion")
    insertion = explain_checks.perturbation_auc(probabilities, normalise, images, right, targets, "insertion")
    insertion_random = explain_checks.perturbation_auc(probabilities, normalise, images, random, targets, "insertion")
    assert np.all(deletion <= deletion_random) and np.all(insertion >= insertion_random)
    assert deletion.mean() < deletion_random.mean() - 0.1 and insertion.mean() > insertion_random.mean() + 0.05
    # the square is 1/16 of the pixels: deleted by the first curve point, so the AUC is the trapezoid's first half-step
    assert deletion[0] == pytest.approx(230 / 255 / 16 / 2, abs=1e-6)
    compared = explain_checks._compare_auc(deletion, deletion_random, "deletion", 200, 0)
    assert compared["beats_random"] and compared["difference_ci"][1] < 0


@pytest.mark.parametrize("model_type", ["resnet", "vit", "efficientnet", "cvt"])
def test_cascade_goes_from_the_head_down_and_ends_with_everything(model_type):
    paths = _parameter_paths(model_type)
    stages = explain_checks.cascade(model_type, paths)
    assert stages[0][0] == "head" and stages[-1] == ("all", paths)
    sizes = [len(chosen) for _, chosen in stages]
    assert sizes == sorted(sizes) and sizes[0] > 0 and len(set(sizes)) == len(sizes)
    assert all(set(a) <= set(b) for (_, a), (_, b) in zip(stages, stages[1:]))
    assert all(p.startswith(explain_checks.HEADS[model_type]) for p in stages[0][1])


def _parameter_paths(model_type):
    import jax
    import transformers

    from jaxmed.train import optim
    hf = {"resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
          "vit": transformers.ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=32, image_size=32, patch_size=8),
          "efficientnet": transformers.EfficientNetConfig(width_coefficient=0.1, depth_coefficient=0.1,
                                                          image_size=32, hidden_dim=128),
          "cvt": transformers.CvtConfig(embed_dim=[8, 16, 32], depth=[1, 2, 3], num_heads=[1, 1, 2])}[model_type]
    model = nnx.eval_shape(lambda: MODELS[model_type][1](hf, rngs=nnx.Rngs(0)))  # shapes only: no weights drawn
    return [optim.dotted(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


def test_randomisation_of_a_model_changes_its_grad_cam():
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    model = MODELS["resnet"][1](config, rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    maps = explain.grad_cam(model, pixels)
    result = explain_checks.randomisation(model, explain.grad_cam, pixels, maps, seed=0, bootstrap=100)
    assert [s["stage"] for s in result["stages"]] == ["head", "top block", "all"]
    # re-initialising with the model's own weights would give ρ = 1: check the check can tell
    same = explain_checks._spearman(maps[0], np.asarray(explain.grad_cam(model, pixels))[0])
    assert same == pytest.approx(1.0)
    assert all(s["spearman"] is None or s["spearman"] < 0.99 for s in result["stages"])


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """The demo config shortened (as tests/test_demo.py), trained and evaluated once for this module."""
    root = tmp_path_factory.mktemp("demo")
    config = config_file("configs/demo.py")
    config.data.cache_dir = str(root / "cache")
    config.train.async_checkpoints = False
    config.eval.bootstrap = 100
    config.eval.explain_check_images = 24
    config.data.synthetic.train_per_class = 400
    config.data.synthetic.test_per_class = 25
    config.train.epochs = 3
    config.train.min_steps = 0
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(config.to_json_best_effort(indent=2))
    result = experiment.train_and_evaluate(config, root / "run")
    assert result["test"]["accuracy"] >= 0.8, result["test"]["accuracy"]
    return root / "run"


def test_every_evaluation_checks_its_explanations(trained_demo):
    checks = json.loads((trained_demo / "eval/test/explanations.json").read_text())
    report = json.loads((trained_demo / "eval/test/report.json").read_text())
    assert report["explanations"] == checks and checks["images"] == 24
    grad_cam = checks["methods"]["grad_cam"]
    for kind in ("deletion", "insertion"):
        entry = grad_cam[kind]
        assert 0 <= entry["auc"] <= 1 and 0 <= entry["random_auc"] <= 1
        assert entry["difference_ci"][0] <= entry["difference"] <= entry["difference_ci"][1]
    assert [s["stage"] for s in grad_cam["randomisation"]["stages"]] == ["head", "top block", "top half", "all"]
    place = grad_cam["localisation"]
    assert place["images"] == 18 and place["without_lesion"] == 6  # 6 of 24 sampled images are no_tumor
    assert set(place["per_class"]) == {"glioma", "meningioma", "pituitary"}
    assert "lesion" in grad_cam["verdict"]
    page = (trained_demo / "eval/test/report.html").read_text()
    assert "pointing game" in page and grad_cam["verdict"].split(";")[0] in page


def _stress(workdir, *args):
    return subprocess.run([sys.executable, "-m", "jaxmed.stress", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=600)


def test_stress_severity_zero_is_the_evaluation_and_noise_hurts(trained_demo):
    from jaxmed.stress.run import stress_workdir

    summary = stress_workdir(trained_demo, names=["gaussian_noise", "contrast"], severities=[1, 5])
    records = json.loads((trained_demo / "stress/test/stress.json").read_text())
    report = json.loads((trained_demo / "eval/test/report.json").read_text())
    clean = records[0]
    noisiest = next(r for r in records if r["corruption"] == "gaussian_noise" and r["severity"] == 5)
    assert (clean["corruption"], clean["severity"]) == ("none", 0)
    assert clean["accuracy"] == report["accuracy"] and clean["balanced_accuracy"] == report["balanced_accuracy"]
    assert clean["macro_auc"] == report["roc_auc"]["macro"]
    assert clean["ece_15"] == report["calibration"]["after"]["ece_15"]
    # the run's conformal sets, as the evaluation measured them on the same clean images
    assert clean["conformal_coverage"] == report["conformal"]["coverage"]["value"]
    assert clean["mean_set_size"] == report["conformal"]["mean_set_size"]
    # and its OOD detectors: the clean split's flag rate is the evaluation's; heavy noise is flagged more often
    assert clean["ood_flag_rate"] == report["ood"]["flag_rate"]["rate"]
    assert noisiest["ood_flag_rate"] > clean["ood_flag_rate"]
    assert noisiest["balanced_accuracy"] < clean["balanced_accuracy"] - 0.1, (noisiest, clean)
    assert summary["corruptions"]["gaussian_noise"]["rBE"] > 0
    for name in ("stress.md", "stress.html", "summary.json", "stress_heatmap.png", "stress_curves.png",
                 "stress_examples.png"):
        assert (trained_demo / "stress/test" / name).stat().st_size > 0


def test_stress_cli_is_deterministic_and_says_what_is_wrong(trained_demo):
    first = _stress(trained_demo, "--corruptions", "rician_noise,rotation", "--severities", "2,4")
    assert first.returncode == 0, first.stderr
    once = (trained_demo / "stress/test/stress.json").read_bytes()
    again = _stress(trained_demo, "--corruptions", "rician_noise,rotation", "--severities", "2,4")
    assert again.returncode == 0 and (trained_demo / "stress/test/stress.json").read_bytes() == once
    assert len(json.loads(once)) == 1 + 2 * 2
    for args, words in ((["--corruptions", "fog"], "known: bias_field"), (["--split", "train"], "no 'train' split"),
                        (["--severities", "7"], "one of 1, 2, 3, 4, 5")):
        bad = _stress(trained_demo, *args)
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert bad.returncode == 2 and len(errors) == 1 and words in errors[0], bad.stderr
        assert "Traceback" not in bad.stderr and bad.stderr.strip().splitlines()[-1] == errors[0], bad.stderr
