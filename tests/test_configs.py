"""Every experiment config loads and states its protocol; the command line fails clearly on bad input."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmed.data.sources import LOADERS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    from jaxmed.models import MODELS

    config = _load(path)
    assert config.data.format in LOADERS
    assert config.model.init_from or config.model.name in MODELS
    assert config.train.batch_size > 0 and (config.train.epochs > 0 or config.train.phases)


def test_reference_protocols():
    sartaj = _load(ROOT / "configs/sartaj_vit.py")
    assert (sartaj.optim.name, sartaj.optim.lr, sartaj.optim.weight_decay, sartaj.optim.schedule) == \
        ("adamw", 2e-5, 0.01, "linear")
    assert (sartaj.train.batch_size, sartaj.train.epochs, sartaj.data.split_seed, sartaj.data.val_fraction) == \
        (16, 10, 42, 0.2)
    assert sartaj.train.best_metric == "accuracy" and sartaj.data.augment.rotation == 15.0
    kermany = _load(ROOT / "configs/chestxray_effnet.py")
    assert kermany.data.balanced_sampling and kermany.data.merge_train_val
    head, everything = kermany.train.phases
    assert (head["epochs"], head["lr"], head["trainable"]) == (5, 1e-3, ("classifier",))
    assert (everything["epochs"], everything["lr"]) == (8, 1e-4)
    probe = _load(ROOT / "configs/brisc_vit_linear_probe.py")
    assert probe.optim.trainable == ("classifier",) and probe.train.epochs == 20


def _main(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "jaxmed.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    done = _main("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.train.epoch=3")
    assert done.returncode == 2
    assert "unknown config key --config.train.epoch" in done.stderr and "epochs" in done.stderr
    assert "batch_size" in done.stderr and "Traceback" not in done.stderr


def test_missing_data_and_offline_hub_are_clear_errors(tmp_path):
    done = _main("--config", "configs/brisc_vit_scratch.py", "--workdir", str(tmp_path / "a"),
                 f"--config.data.root={tmp_path}/nowhere")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "BRISC 2025 from Kaggle" in done.stderr and "--config.data.root=PATH" in done.stderr
    assert "configs/demo.py" in done.stderr
    done = _main("--config", "configs/sartaj_vit.py", "--workdir", str(tmp_path / "b"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "google/vit-base-patch16-224" in done.stderr and "--local-dir" in done.stderr
