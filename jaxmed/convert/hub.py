"""Read and write Hugging Face model directories: config.json, safetensors weights, preprocessor_config.json."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxmed.convert.tables import TABLES
from jaxmed.convert.core import to_flax, to_hf
from jaxmed.errors import JaxmedError
from jaxmed.models import MODELS
from jaxmed.models.layers import Static

log = logging.getLogger("jaxmed.convert")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def resolve(src: str | Path) -> Path:
    """A local HF model directory, or a hub id fetched into the HF cache (which needs the network)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise JaxmedError(f"{path} has no config.json: not a Hugging Face model directory "
                              "(expected config.json and model.safetensors, as save_pretrained writes them)")
        return path
    if path.exists():
        raise JaxmedError(f"{path} is a file; pass the model directory that holds config.json")
    if not _HUB_ID.fullmatch(str(src)):
        raise JaxmedError(f"no such model directory: {src}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin"]))
    except Exception as error:  # offline, unknown id, gated repo: all end the same way for the user
        raise JaxmedError(
            f"{src!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}; offline?). On a machine with internet run `hf download {src} --local-dir DIR` "
            "and pass DIR instead") from None


def read_config(path: Path):
    """config.json → the transformers config class of a supported architecture."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise JaxmedError(f"cannot read {path / 'config.json'}: {error}") from None
    model_type = raw.get("model_type")
    if model_type not in MODELS:
        raise JaxmedError(f"unsupported architecture {model_type!r} in {path / 'config.json'}; "
                          f"jaxmed supports: {', '.join(sorted(MODELS))}")
    config_class, _ = MODELS[model_type]
    return config_class.from_pretrained(str(path))


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy: safetensors preferred, a torch .bin only weights-only."""
    present = [name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise JaxmedError(f"no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}")
    name = present[0]
    files = [path / name]
    if name.endswith(".index.json"):
        index = json.loads((path / name).read_text())
        files = [path / shard for shard in sorted(set(index["weight_map"].values()))]
    tensors = {}
    for file in files:
        tensors.update(_load_safetensors(file) if file.suffix == ".safetensors" else _load_torch_bin(file))
    return tensors


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except Exception as error:
        raise JaxmedError(f"{file} is corrupted or not a safetensors file ({error}); "
                          "re-download or re-export the checkpoint") from None


def _load_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise JaxmedError(f"{file} is a PyTorch pickle; install jaxmed[torch] to read it (weights only), "
                          "or convert the checkpoint to model.safetensors") from None
    try:
        # weights_only: never execute code from a checkpoint file.
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:
        raise JaxmedError(f"cannot read {file} as weights-only PyTorch state dict ({error})") from None
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def _variables(model) -> nnx.State:
    return nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))


def _dotted(key: tuple) -> str:
    return ".".join(str(part) for part in key)


def flat_weights(model) -> dict[str, np.ndarray]:
    """Our parameters and batch statistics as {dotted path: numpy array}."""
    return {_dotted(key): np.asarray(var.value) for key, var in _variables(model).flat_state()}


def convert_checkpoint(tensors: dict[str, np.ndarray], expected: dict[str, tuple], model_type: str, *,
                       num_labels: int, allow_head_mismatch: bool = False) -> dict[str, np.ndarray]:
    """HF tensors → {our dotted path: array} for the paths in `expected` ({path: (shape, dtype)}).

    Missing weights are an error naming them; unused keys and re-initialised head leaves (absent from the result)
    are logged. Used on a concrete model (`load_weights`) and on the trainer's abstract, sharded state.
    """
    table, _ = TABLES[model_type]
    values, report = to_flax(tensors, expected, table, allow_head_mismatch=allow_head_mismatch)
    if report.missing:
        shown = ", ".join(report.missing[:8]) + (f" … ({len(report.missing)} in all)" if len(report.missing) > 8 else "")
        raise JaxmedError(f"the checkpoint lacks weights the {model_type} model needs: {shown} "
                          f"(HF keys {', '.join(table.hf_key(p)[0] for p in report.missing[:3])}…)")
    if report.unexpected:
        log.warning("unused checkpoint keys (%d): %s", len(report.unexpected), ", ".join(report.unexpected[:20]))
    if report.reinitialised:
        log.warning("re-initialised %s for %d labels (not taken from the checkpoint)",
                    ", ".join(report.reinitialised), num_labels)
    return values


def load_weights(model, tensors: dict[str, np.ndarray], *, allow_head_mismatch: bool = False) -> None:
    """Copy an HF state dict into `model` in place; report what was re-initialised, refuse what is missing."""
    state = _variables(model)
    flat = state.flat_state()
    expected = {_dotted(key): (var.value.shape, var.value.dtype) for key, var in flat}
    values = convert_checkpoint(tensors, expected, model.config.model_type, num_labels=model.config.num_labels,
                                allow_head_mismatch=allow_head_mismatch)
    pure = traverse_util.unflatten_dict(
        {key: (jnp.asarray(values[_dotted(key)]) if _dotted(key) in values else var.value) for key, var in flat})
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def relabel(config, num_labels: int | None = None, id2label: dict | None = None, label2id: dict | None = None):
    """Apply HF-style label overrides to a config in place; True when the head no longer fits the checkpoint."""
    checkpoint_labels = config.num_labels
    if id2label is not None:
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.label2id = dict(label2id) if label2id else {v: int(k) for k, v in config.id2label.items()}
        num_labels = num_labels or len(config.id2label)
    if num_labels is not None and num_labels != config.num_labels:
        if id2label is None:
            config.num_labels = num_labels  # transformers then names them LABEL_0 …
        if len(config.id2label) != num_labels:
            raise JaxmedError(f"num_labels={num_labels} but id2label has {len(config.id2label)} entries")
    return config.num_labels != checkpoint_labels


def read_preprocessor(path: Path, model_type: str) -> dict:
    """The directory's preprocessor_config.json, else the architecture's reference one."""
    file = path / "preprocessor_config.json"
    return json.loads(file.read_text()) if file.is_file() else dict(TABLES[model_type][1])


def build_loaded(model_class, config, tensors: dict[str, np.ndarray], *, dtype=None, seed: int = 0,
                 allow_head_mismatch: bool = False):
    """The model with an HF checkpoint's weights, never randomly initialising what the checkpoint provides: eager
    init compiles one RNG kernel per parameter shape (82 in EfficientNet-B0, ~0.4 s each on a CPU)."""
    abstract = nnx.eval_shape(lambda: model_class(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    expected = {_dotted(key): (var.value.shape, var.value.dtype) for key, var in _variables(abstract).flat_state()}
    values = convert_checkpoint(tensors, expected, config.model_type, num_labels=config.num_labels,
                                allow_head_mismatch=allow_head_mismatch)
    return build_with_weights(model_class, config, values, dtype=dtype, seed=seed, partial=True, abstract=abstract)


def build_with_weights(model_class, config, values: dict[str, np.ndarray], *, dtype=None, seed: int = 0,
                       partial: bool = False, abstract=None):
    """The model from {dotted path: array} (ours, as `flat_weights` gives); with `partial`, absent leaves (a new
    head) are freshly initialised — jit then keeps only their initialisers. `abstract`: the model's eval_shape,
    when the caller has it already."""
    def build():
        return model_class(config, dtype=dtype, rngs=nnx.Rngs(seed))

    weights_filter = nnx.Any(nnx.Param, nnx.BatchStat)
    graphdef, weights, _ = nnx.split(abstract if abstract is not None else nnx.eval_shape(build), weights_filter, ...)
    flat = weights.flat_state()
    expected = {_dotted(key): var.value for key, var in flat}
    missing = set(expected) - set(values)
    if missing and not partial:
        raise JaxmedError(f"weights missing for {len(missing)} of {len(expected)} model variables: "
                          f"{', '.join(sorted(missing)[:5])}")
    for path in expected.keys() & values.keys():
        if tuple(np.shape(values[path])) != tuple(expected[path].shape):
            raise JaxmedError(f"{path}: the weights have shape {np.shape(values[path])}, the model "
                              f"{tuple(expected[path].shape)} — not the model these weights were trained as")

    def fresh_leaves():
        return {_dotted(k): v.value for k, v in _variables(build()).flat_state() if _dotted(k) in missing}

    fresh = jax.jit(fresh_leaves)() if missing else {}
    nnx.replace_by_pure_dict(weights, traverse_util.unflatten_dict(
        {key: jnp.asarray(values.get(_dotted(key), fresh.get(_dotted(key))), dtype=expected[_dotted(key)].dtype)
         for key, _ in flat}))
    # the rng streams alone: jit drops the unused parameter initialisers before compiling
    rest = jax.jit(lambda: nnx.split(build(), weights_filter, ...)[2])()
    return nnx.merge(graphdef, weights, rest)


def from_pretrained(src, num_labels: int | None = None, id2label: dict | None = None,
                    label2id: dict | None = None, *, dtype=None, seed: int = 0):
    """Load an HF image classifier (local directory or hub id) as a jaxmed model, in eval mode like HF."""
    path = resolve(src)
    config = read_config(path)
    relabelled = relabel(config, num_labels, id2label, label2id)
    tensors = load_state_dict(path)
    _, model_class = MODELS[config.model_type]
    model = build_loaded(model_class, config, tensors, dtype=dtype, seed=seed, allow_head_mismatch=relabelled)
    model.hf_preprocessor = Static(read_preprocessor(path, config.model_type))
    model.eval()
    return model


def preprocessor_config(model) -> dict:
    """The model's preprocessor_config.json: the one it was loaded with, else its architecture's default."""
    stored = getattr(model, "hf_preprocessor", None)
    return dict(stored.value) if stored is not None else dict(TABLES[model.config.model_type][1])


def save_pretrained(model, out_dir) -> Path:
    """Write an HF directory that `transformers.AutoModelForImageClassification.from_pretrained` opens (for the
    architectures transformers has; the SAE's directory, which it cannot open, is described in models/sae.py)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, _ = TABLES[model.config.model_type]
    config = copy.deepcopy(model.config)
    config.architectures = [table.hf_class]
    config.save_pretrained(str(out))
    save_file(to_hf(flat_weights(model), table), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model), indent=2) + "\n")
    return out
