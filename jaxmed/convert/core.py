"""HF state dict ⇄ flat Flax pure dict, driven by one declarative `Table` per architecture (MaxText style).

Our module attribute names mirror HF checkpoint keys, so a parameter path `vit.encoder.layer.0.attention.
attention.query.kernel` maps to `vit.encoder.layer.0.attention.attention.query.weight` by the generic leaf rules
below; a table only lists where an architecture departs from that (prefix renames, ignored keys, the head).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping

import numpy as np

from jaxmed.errors import JaxmedError

log = logging.getLogger("jaxmed.convert")


def _identity(tensor):
    return tensor


@dataclasses.dataclass(frozen=True)
class Leaf:
    """How one parameter leaf name maps to HF, and how its tensor is laid out on each side."""

    flax: str
    hf: str
    to_flax: Callable[[np.ndarray], np.ndarray] = _identity
    to_hf: Callable[[np.ndarray], np.ndarray] = _identity
    hf_dtype: np.dtype | None = None  # the dtype PyTorch stores, when it differs from ours


def _kernel_to_flax(t):
    # Linear (out, in) → (in, out); Conv (O, I, kh, kw) → (kh, kw, I, O). Depthwise convs are (C, 1, kh, kw) in
    # PyTorch and (kh, kw, 1, C) with feature_group_count=C in Flax: the same permutation.
    return t.T if t.ndim == 2 else np.transpose(t, (2, 3, 1, 0)) if t.ndim == 4 else t


def _kernel_to_hf(t):
    return t.T if t.ndim == 2 else np.transpose(t, (3, 2, 0, 1)) if t.ndim == 4 else t


# Generic leaf rules, shared by all architectures; any other leaf keeps its name and layout.
LEAVES = (
    Leaf("kernel", "weight", _kernel_to_flax, _kernel_to_hf),
    Leaf("scale", "weight"),
    Leaf("mean", "running_mean"),
    Leaf("var", "running_var"),
    Leaf("num_batches_tracked", "num_batches_tracked", hf_dtype=np.dtype(np.int64)),
)
_BY_FLAX = {leaf.flax: leaf for leaf in LEAVES}


@dataclasses.dataclass(frozen=True)
class Table:
    """Where one architecture's paths depart from the generic rules."""

    hf_class: str  # transformers class written into config.json "architectures"
    base_prefix: str  # HF base_model_prefix: a headless checkpoint (e.g. ViTModel) has keys without it; "" = none
    renames: tuple[tuple[str, str], ...] = ()  # (our path prefix, HF key prefix)
    head: tuple[str, ...] = ("classifier",)  # our path prefixes re-initialised when num_labels changes
    ignore_hf: tuple[str, ...] = ()  # regexes of HF keys we knowingly do not model (e.g. an unused pooler)
    hooks: tuple[tuple[str, Leaf], ...] = ()  # (our full path regex, Leaf) for tensors needing a special layout

    def hf_key(self, path: str) -> tuple[str, Leaf]:
        prefix, _, name = path.rpartition(".")
        hooked = [leaf for pattern, leaf in self.hooks if re.fullmatch(pattern, path)]
        leaf = hooked[0] if hooked else _BY_FLAX.get(name, Leaf(name, name))
        for ours, theirs in self.renames:
            if prefix == ours or prefix.startswith(ours + "."):
                prefix = theirs + prefix[len(ours):]
                break
        return (f"{prefix}.{leaf.hf}" if prefix else leaf.hf), leaf

    def is_head(self, path: str) -> bool:
        return any(path == h or path.startswith(h + ".") for h in self.head)


@dataclasses.dataclass
class LoadReport:
    missing: list[str]  # our paths that the checkpoint does not provide (fatal unless head)
    unexpected: list[str]  # HF keys we did not use
    reinitialised: list[str]  # head paths left at their fresh initialisation


def add_base_prefix(tensors: Mapping[str, np.ndarray], table: Table) -> dict[str, np.ndarray]:
    """A checkpoint of the bare backbone (e.g. `ViTModel`, `google/vit-base-patch16-224-in21k`) lacks the prefix."""
    prefix = table.base_prefix + "."
    if not table.base_prefix or any(k.startswith(prefix) for k in tensors):
        return dict(tensors)
    return {prefix + k: v for k, v in tensors.items()}


def to_flax(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
            table: Table, *, allow_head_mismatch: bool) -> tuple[dict[str, np.ndarray], LoadReport]:
    """Convert an HF state dict to our flat {path: array}.

    `expected` gives each of our paths its (shape, dtype). A shape mismatch is an error naming the key, except in
    the head when `allow_head_mismatch` (a new num_labels): those leaves are left out and reported.
    """
    tensors = add_base_prefix(tensors, table)
    out, missing, reinit, used = {}, [], [], set()
    for path, (shape, dtype) in expected.items():
        key, leaf = table.hf_key(path)
        if key not in tensors:
            (reinit if table.is_head(path) else missing).append(path)
            continue
        used.add(key)
        value = leaf.to_flax(np.asarray(tensors[key]))
        if tuple(value.shape) != tuple(shape):
            if allow_head_mismatch and table.is_head(path):
                reinit.append(path)
                continue
            raise JaxmedError(f"shape mismatch for {key}: the model expects {_torch_shape(leaf, shape)} "
                              f"(HF layout), the checkpoint has {tuple(tensors[key].shape)}")
        out[path] = value.astype(dtype, copy=False)
    unexpected = [k for k in tensors if k not in used and not any(re.fullmatch(p, k) for p in table.ignore_hf)]
    return out, LoadReport(missing, unexpected, reinit)


def _torch_shape(leaf: Leaf, shape) -> tuple[int, ...]:
    return tuple(leaf.to_hf(np.empty(shape, np.uint8)).shape) if len(shape) in (2, 4) else tuple(shape)


def to_hf(flat: Mapping[str, np.ndarray], table: Table) -> dict[str, np.ndarray]:
    """Our flat {path: array} → HF state dict, each tensor contiguous in PyTorch layout and dtype."""
    out = {}
    for path, value in flat.items():
        key, leaf = table.hf_key(path)
        tensor = leaf.to_hf(np.asarray(value))
        if leaf.hf_dtype is not None:
            tensor = tensor.astype(leaf.hf_dtype)
        out[key] = np.array(tensor, order="C")  # not ascontiguousarray: it turns 0-d scalars into 1-d
    return out
