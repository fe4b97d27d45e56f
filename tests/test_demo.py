"""The demo config learns the synthetic phantoms (shortened: fewer images and epochs than `make demo`) and a small
real image folder (scikit-learn's bundled handwritten digits) given with data.format=imagefolder; its export opens
in transformers with the logits jaxmed computes."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import torch
from transformers import AutoModelForImageClassification

from jaxmed import experiment, export, train

ROOT = Path(__file__).resolve().parents[1]


def _demo_config(tmp_path):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.async_checkpoints = False
    config.eval.bootstrap = 100
    return config


def test_shortened_demo_learns_and_exports_to_transformers(tmp_path):
    config = _demo_config(tmp_path)
    config.data.synthetic.train_per_class = 1000
    config.data.synthetic.test_per_class = 25
    config.train.epochs = 2
    result = experiment.train_and_evaluate(config, tmp_path / "run")
    assert result["test"]["accuracy"] >= 0.5, result["test"]["accuracy"]  # chance is 0.25
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


def test_demo_config_learns_a_small_real_image_folder(tmp_path):
    config = _demo_config(tmp_path)
    config.data.format = "imagefolder"
    config.data.root = str(_digits_folder(tmp_path / "digits"))
    config.train.epochs = 10
    result = experiment.train_and_evaluate(config, tmp_path / "run")
    assert result["test"]["accuracy"] >= 0.8, result["test"]["accuracy"]  # chance is 0.25
