"""The demo config learns the synthetic phantoms (shortened: fewer images and epochs than `make demo`) and a small
real image folder (scikit-learn's bundled handwritten digits) given with data.format=imagefolder, with the training
budget stretched to train.min_steps; its export opens in transformers with the logits jaxmed computes."""

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from ml_collections import ConfigDict
from transformers import AutoModelForImageClassification

from helpers_configs import config_file
from jaxmed import experiment, export, train
from jaxmed.train.optim import Phase
from jaxmed.train.run import training_budget


def _demo_config(tmp_path):
    config = config_file("configs/demo.py")
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.async_checkpoints = False
    config.eval.bootstrap = 100
    return config


def test_shortened_demo_learns_and_exports_to_transformers(tmp_path):
    config = _demo_config(tmp_path)
    config.data.synthetic.train_per_class = 400
    config.data.synthetic.test_per_class = 25
    config.train.epochs = 3
    config.train.min_steps = 0
    result = experiment.train_and_evaluate(config, tmp_path / "run")
    assert result["test"]["accuracy"] >= 0.8, result["test"]["accuracy"]  # chance is 0.25
    assert (tmp_path / "run/eval/test/confusion_matrix.png").stat().st_size > 0

    export.export(tmp_path / "run", tmp_path / "hf")
    torch_model = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    model, _ = export.load_trained(tmp_path / "run")
    run = train.setup(config, tmp_path / "run")
    test = run.dataset.splits["test"]
    pixels = np.array(run.preprocessor.normalize(np.asarray(test.images)))
    ours = np.asarray(model(pixels))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) <= 1e-4, np.max(np.abs(ours - theirs))
    assert np.mean(ours.argmax(-1) == test.labels) == result["test"]["accuracy"]


def _digits_folder(root: Path, classes=(0, 1, 2, 3), train=120, test=40) -> Path:
    """Real images: scikit-learn's 8×8 handwritten digits, upscaled to 32×32 PNGs in DIR/{train,test}/<class>/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in classes:
        images = digits.images[digits.target == digit]
        for split, chunk in (("train", images[:train]), ("test", images[train:train + test])):
            folder = root / split / f"digit_{digit}"
            folder.mkdir(parents=True)
            for i, image in enumerate(chunk):
                pixels = cv2.resize((image * 255 / 16).astype(np.uint8), (32, 32), interpolation=cv2.INTER_CUBIC)
                cv2.imwrite(str(folder / f"{i:03d}.png"), pixels)
    return root


def test_demo_config_learns_a_small_real_image_folder(tmp_path, caplog):
    """The README's "your own images" command as it is: 96 training images a class are 3 steps an epoch, so the
    budget follows train.min_steps, and early stopping ends it once val stops improving."""
    config = _demo_config(tmp_path)
    config.data.format = "imagefolder"
    config.data.root = str(_digits_folder(tmp_path / "digits"))
    with caplog.at_level("INFO", logger="jaxmed.train"):
        result = experiment.train_and_evaluate(config, tmp_path / "run")
    assert result["test"]["accuracy"] >= 0.9, result["test"]["accuracy"]  # chance is 0.25
    budget = next(record.getMessage() for record in caplog.records if "training budget" in record.getMessage())
    assert "fewer than train.min_steps=1000: training 1000 steps" in budget, budget
    assert result["steps"] <= 1000
    summary = json.loads((tmp_path / "run/train_summary.json").read_text())
    assert summary["steps"] == result["steps"] and summary["parameters"] > 10_000 and summary["train_seconds"] > 0


def test_training_budget_stretches_short_runs_only():
    plan = [Phase("head", 2, 1e-3), Phase("all", 3, 1e-4)]
    train_config = ConfigDict(dict(min_steps=100, steps=0, batch_size=8, early_stopping_patience=0,
                                   best_metric="accuracy"))
    stretched, budget = training_budget(plan, 4, train_config)  # 5 epochs × 4 steps = 20 < 100
    assert [phase.epochs for phase in stretched] == [10, 15]  # both phases, in proportion
    assert budget == ("5 epochs of 4 steps (batch 8) = 20 steps, fewer than train.min_steps=100: training 100 "
                      "steps (25.0 epochs) instead")
    same, budget = training_budget(plan, 40, train_config)  # 200 steps: enough
    assert same == plan and "fewer" not in budget
    train_config.steps = 20  # an explicit step count is never stretched
    assert training_budget(plan, 4, train_config)[0] == plan
