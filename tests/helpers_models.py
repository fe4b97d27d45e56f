"""Parity machinery shared by the CvT and EfficientNet tests: HF models with non-trivial weights and statistics, one
train-mode step compared tensor by tensor in our layout, and the bit-exact HF → jaxmed → HF round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.numpy import load_file

from hf_utils import nhwc
from jaxmed.convert import TABLES, from_pretrained, save_pretrained
from jaxmed.convert.core import to_flax, to_hf
from jaxmed.convert.hub import flat_weights


def randomize_weights(model: torch.nn.Module, seed: int = 0, gain: float = 1.5) -> None:
    """O(1) activations everywhere, and BatchNorm statistics far from 0/1.

    HF's std-0.02 init leaves attention uniform and logits tiny, which would hide most layout mistakes.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cls_token"):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * gain / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            else:  # LayerNorm / BatchNorm scale
                param.copy_(1 + torch.randn(param.shape, generator=gen) * 0.2)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) * 1.5 + 0.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))


def randomize_statistics(model: nnx.Module, seed: int = 0) -> None:
    """The same for a jaxmed model: running means in [-0.75, 0.75], variances in [0.5, 2]."""
    stats = nnx.state(model, nnx.BatchStat)
    keys = iter(jax.random.split(jax.random.key(seed), len(stats.flat_state())))
    for path, var in stats.flat_state():
        if path[-1] in ("mean", "var"):
            noise = jax.random.uniform(next(keys), var.shape, minval=0.5, maxval=2.0)
            var[...] = noise if path[-1] == "var" else noise - 1.25
    nnx.update(model, stats)


def save_hf(model: torch.nn.Module, directory) -> str:
    model.save_pretrained(str(directory))
    return str(directory)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# Module-level jitted steps: compiling is the tests' main cost, and models of one config share the program.
@nnx.jit
def eval_forward(model, pixels):
    return model.forward(pixels, output_hidden_states=True, output_attentions=True)


@nnx.jit
def train_step(model, pixels, labels):
    """Train-mode forward (BatchNorm statistics update in place) and cross-entropy gradients."""

    def loss_fn(model):
        logits = model(pixels)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, grads


def check_train_step(hf: torch.nn.Module, ours: nnx.Module, x: np.ndarray, labels: np.ndarray,
                     forward=lambda model, pixels: model(pixels), step=train_step) -> dict:
    """One train-mode step against `hf.train()`: logits, loss, every BatchNorm buffer, every gradient.

    Gradients are compared in our layout (HF's converted through the table). Returns the measured errors.
    `step`: how ours runs it (`train_step`'s signature and in-place statistics updates).
    """
    table = TABLES[ours.config.model_type][0]
    hf.train().zero_grad()
    ref_logits = forward(hf, torch.from_numpy(x)).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, torch.from_numpy(labels))
    ref_loss.backward()
    ours.train()
    loss, logits, grads = step(ours, nhwc(x), jnp.asarray(labels))
    result = {"logits": max_diff(logits, ref_logits.detach()), "loss": abs(float(loss) - ref_loss.item())}
    assert result["logits"] <= 1e-4 and result["loss"] <= 1e-5, result

    ref_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    state = to_hf(flat_weights(ours), table)
    assert set(state) == set(ref_state), set(state) ^ set(ref_state)
    result["running_stats"] = max(max_diff(state[k], ref_state[k]) for k in state if "running_" in k)
    for key, value in state.items():  # statistics to float precision; the rest, num_batches_tracked too, exactly
        tolerance = 1e-5 * max(1.0, float(np.abs(ref_state[key]).max())) if "running_" in key else 0.0
        assert max_diff(value, ref_state[key]) <= tolerance, key

    flat = {".".join(map(str, k)): np.asarray(v[...]) for k, v in grads.flat_state()}
    ref, report = to_flax({k: p.grad.numpy() for k, p in hf.named_parameters()},
                          {k: (v.shape, v.dtype) for k, v in flat.items()}, table, allow_head_mismatch=False)
    assert not report.missing and not report.unexpected and set(ref) == set(flat)
    # Some parameters cannot change the loss (a shift common to every attention key, which softmax ignores; a
    # shift a train-mode BatchNorm subtracts again). Their true gradient is 0 and both frameworks return rounding
    # noise, so they are held to zero against the largest gradient instead of to a relative error.
    largest = max(float(np.abs(g).max()) for g in ref.values())
    null = {k for k in ref if float(np.abs(ref[k]).max()) <= 1e-6 * largest}
    for key in null:
        assert float(np.abs(flat[key]).max()) <= 1e-5 * largest, key
    squared = lambda k: np.sum((flat[k].astype(np.float64) - ref[k]) ** 2)  # noqa: E731
    result["grad_global_rel"] = float(np.sqrt(sum(squared(k) for k in ref) / sum(np.sum(ref[k] ** 2.0) for k in ref)))
    result["grad_worst_rel"], result["grad_worst_tensor"] = max(
        (max_diff(flat[k], ref[k]) / float(np.abs(ref[k]).max()), k) for k in ref if k not in null)
    result["zero_grad_tensors"] = sorted(null)
    assert result["grad_global_rel"] <= 1e-4 and result["grad_worst_rel"] <= 1e-4, result
    return result


def check_bit_identical_round_trip(directory: str, out_dir) -> None:
    """HF → jaxmed → HF writes every tensor back unchanged: same keys, dtypes, shapes and bytes."""
    out = save_pretrained(from_pretrained(directory), out_dir)
    original, exported = load_file(f"{directory}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert set(original) == set(exported), set(original) ^ set(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and exported[key].shape == tensor.shape, key
        assert np.array_equal(exported[key], tensor), key
