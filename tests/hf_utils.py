"""Helpers for parity tests: random-init HF models saved locally (the same files a hub download gives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxmed.convert import TABLES
from jaxmed.convert.core import to_hf


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so BatchNorm conversion mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            # gammas below 1 as in trained networks, so 50 layers of residual sums stay O(10), not O(1e4)
            module.weight.data.copy_(torch.rand(n, generator=gen) * 0.4 + 0.2)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
            module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))


def perturb_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Random-init biases are zeros and norm weights ones: perturb every parameter so none is trivial
    (a swapped bias or a skipped LayerNorm then shows) and every tensor is unique (see checkpoint_names)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_hf(model: torch.nn.Module, directory) -> str:
    """Save like a hub checkpoint, after making every parameter non-trivial and unique."""
    perturb_parameters(model)
    model.save_pretrained(str(directory))
    return str(directory)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalised-looking NCHW float32 images."""
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


def checkpoint_names(model: torch.nn.Module, directory) -> dict[str, str]:
    """In-memory parameter name → key in the saved checkpoint.

    transformers 5 renames some modules in memory (ViT's `q_proj`) but saves the hub's legacy keys
    (`attention.attention.query`); random-init tensors are unique, so matching by bytes recovers the mapping.
    """
    from safetensors.numpy import load_file

    by_bytes = {v.tobytes(): k for k, v in load_file(f"{directory}/model.safetensors").items()}
    return {name: by_bytes[p.detach().numpy().tobytes()] for name, p in model.named_parameters()}


def torch_grads(model, x: np.ndarray, labels: np.ndarray, directory) -> tuple[float, dict[str, np.ndarray]]:
    """CE-loss gradients of an HF model, keyed like its saved checkpoint in `directory`."""
    names = checkpoint_names(model, directory)
    model.zero_grad()
    logits = model(torch.from_numpy(x)).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long())
    loss.backward()
    grads = {names[k]: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def jax_grads(model, x: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """CE-loss gradients of a jaxmed model, returned in HF layout and keys for comparison."""
    def loss_fn(m):
        logits = m(nhwc(x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    flat = {".".join(map(str, k)): np.asarray(v.value) for k, v in grads.flat_state()}
    table, _ = TABLES[model.config.model_type]
    return float(loss), to_hf(flat, table)


def assert_grads_close(ours: dict, reference: dict, rtol: float = 1e-4) -> dict:
    """Relative error on the global norm and per-tensor max; returns the worst figures for reporting."""
    assert set(ours) == set(reference), (set(ours) ^ set(reference))
    global_ref = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in reference.values()))
    global_diff = np.sqrt(sum(float(np.sum((ours[k].astype(np.float64) - g) ** 2)) for k, g in reference.items()))
    assert global_diff / global_ref <= rtol, (global_diff, global_ref)
    # Some gradients are mathematically zero (an attention key bias shifts every score of a query alike): there
    # both sides are rounding noise, so a tensor's scale is floored at 1e-4 of the largest gradient anywhere.
    floor = 1e-4 * max(float(np.abs(g).max()) for g in reference.values())
    worst = 0.0
    for key, g in reference.items():
        scale = max(float(np.abs(g).max()), floor)
        rel = float(np.abs(ours[key] - g).max()) / scale
        assert rel <= rtol, (key, rel)
        worst = max(worst, rel)
    return {"global_rel": global_diff / global_ref, "worst_tensor_rel": worst}
