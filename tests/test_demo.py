"""The demo config learns the synthetic phantoms (shortened: fewer images and epochs than `make demo`)."""

import importlib.util
from pathlib import Path

from jaxmed import train

ROOT = Path(__file__).resolve().parents[1]


def test_shortened_demo_learns(tmp_path):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.synthetic.train_per_class = 160
    config.data.synthetic.test_per_class = 40
    config.train.epochs = 6
    config.train.async_checkpoints = False
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result["test"]["accuracy"] >= 0.6, result["test"]["accuracy"]  # chance is 0.25
    assert (tmp_path / "run/eval/test/confusion_matrix.png").stat().st_size > 0
