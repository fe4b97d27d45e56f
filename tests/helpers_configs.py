"""Config files (configs/*.py, tests/tiny_config.py) loaded as jaxmed.main loads them: by path, `get_config()`."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config_file(relative: str):
    """The ConfigDict of the config file at `relative` (to the repository root), freshly built."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_tiny_run(workdir: Path) -> Path:
    """tests/tiny_config.py's ViT trained 8 steps (validated at 4 and 8, both kept as best) and evaluated, with an
    operating point for `meningioma`, in `workdir`, as jaxmed.main runs it (config.json first)."""
    from jaxmed import experiment

    config = config_file("tests/tiny_config.py")
    config.data.cache_dir = str(workdir.parent / "cache")
    config.train.async_checkpoints = False
    config.train.keep_best = 2
    config.eval.positive_class = "meningioma"
    config.eval.target_recall = 0.9
    config.eval.bootstrap = 200
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    experiment.train_and_evaluate(config, workdir)
    return workdir
