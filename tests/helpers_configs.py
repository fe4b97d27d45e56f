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
